"""Put on PYTHONPATH by `.ci/seeds` only (never by the project): every Python process of a seeds run, notebook workers
and the CLI subprocesses of tests included, starts from global RNG states drawn from $CXR_PGGAN_RNG_SEED: `random` at
start-up, numpy's legacy global RNG and torch's default generator right after their first import (a light import hook,
so a process that never imports them pays nothing). Different runs get different seeds, so a verdict that leans on
unseeded global randomness shows up as a difference between runs."""
import os, sys

_seed = os.environ.get('CXR_PGGAN_RNG_SEED')
if _seed:
    import importlib.abc, random
    _seed = int(_seed) % 2 ** 32
    random.seed(_seed)
    _AFTER_IMPORT = {'numpy.random': lambda m: m.seed(_seed), 'torch': lambda m: m.manual_seed(_seed)}

    class _SeedAfterImport(importlib.abc.MetaPathFinder):
        "Finds nothing itself: wraps the loader of numpy.random and torch so that their global RNG is seeded once loaded."
        def find_spec(self, name, path, target=None):
            if name not in _AFTER_IMPORT: return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, 'find_spec'): continue
                spec = finder.find_spec(name, path, target)
                if spec is not None: break
            else: return None
            if spec.loader is None or not hasattr(spec.loader, 'exec_module'): return spec
            run, seed = spec.loader.exec_module, _AFTER_IMPORT.pop(name)
            def exec_module(module):
                run(module); seed(module)
            spec.loader.exec_module = exec_module            # this module's own loader object only
            return spec

    sys.meta_path.insert(0, _SeedAfterImport())
