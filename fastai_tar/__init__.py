"Temporal Activation Regularization (TAR) and Activation Regularization (AR) for fastai."
from .functional import ar_penalty, ar_sum_count, mean_of, tar_penalty, tar_sum_count
from .callback import TARCallback

__version__ = '0.1.0'
__all__ = ['TARCallback', 'ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count', 'mean_of']
