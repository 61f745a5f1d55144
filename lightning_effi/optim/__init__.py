"""lightning_effi.optim: a paper-exact, shard-correct LAMB and the param-group helper."""
# isort: skip_file

from lightning_effi.optim.lamb import Lamb
from lightning_effi.optim.norms import FlatLayout
from lightning_effi.optim.param_groups import param_groups

# Imported last on purpose: importing the submodule ``lamb.py`` binds the package attribute ``lamb`` to the
# module; this rebinds it to the functional core, which is the public name.
from lightning_effi.optim.functional import lamb

__all__ = ["Lamb", "lamb", "param_groups", "FlatLayout"]
