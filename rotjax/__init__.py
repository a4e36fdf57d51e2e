"""rotjax: rotation-prediction self-supervised learning and its transfer study."""

__version__ = '0.1.0'
__all__ = ['load']


def __getattr__(name):
  # Lazy: `import rotjax` stays light; jax/orbax load on first use of rotjax.load.
  if name == 'load':
    from rotjax.api import load

    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
