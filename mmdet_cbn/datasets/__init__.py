"""Datasets for tests and demos of mmdet-cbn."""

from .digits_coco import DIGITS_CLASSES, make_digits_coco

__all__ = ['DIGITS_CLASSES', 'make_digits_coco']
