"""What is built on the library rather than part of it: the `fastai-tar` command (`cli`), its `demo` and `bench`, and
the offline data builders they and the notebooks use (`corpus`, the Python documentation as text; `book`, the fastai
book's chapter 12 data). These modules import `fastai_tar`'s library modules, which never import them back;
`fastai_tar.corpus` and `fastai_tar.book` are the same modules under their earlier names."""
