"""rotjax: rotation-prediction self-supervised learning and its transfer study."""
__version__ = '0.1.0'
