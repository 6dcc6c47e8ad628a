"""The embedded default model: a class-conditional UNet trained on scikit-learn's 8x8 digits."""
from .classifier import DigitsClassifier, load_digits_classifier
from .model import N_CLASSES, NULL_CLASS, DigitsUNet
from .pretrained import DigitsModel, load_digits_model

__all__ = [
    "DigitsClassifier",
    "DigitsModel",
    "DigitsUNet",
    "N_CLASSES",
    "NULL_CLASS",
    "load_digits_classifier",
    "load_digits_model",
]
