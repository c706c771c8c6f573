from .tf_rmsprop import TFRMSprop

__all__ = ['TFRMSprop']
