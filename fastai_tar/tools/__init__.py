"""What is built on the library rather than part of it: the `fastai-tar` command (`cli`), its `demo` and `bench`.
These modules import `fastai_tar`'s library modules and its offline data builders (`fastai_tar.corpus`, the Python
documentation as text; `fastai_tar.book`, the fastai book's chapter 12 data), which never import them back."""
