from .atomnas import AtomNAS

__all__ = ['AtomNAS']
