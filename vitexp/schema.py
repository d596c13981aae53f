"""How a group option's schema is found: beside its factory, in a `*_schema.py` module.

Every group whose options build something (model, data, optimizer, schedule) keeps its
factories in one package (`vitexp.models`, `vitexp.data`, `vitexp.optim`) and, for each,
a schema module beside it: `<name>_schema.py`, holding a dataclass that extends the
group's base schema and checks its values (`check`, each mistake one line). Hydra's
ConfigStore holds it under the module's name, which an option extends
(`- /<name>_schema@_here_`), so a new option is its factory, its schema and its YAML file,
and no list elsewhere names it. The values live in the options; a schema gives their types
and allowed values.
"""

import importlib
import pkgutil

from omegaconf import OmegaConf

SCHEMA_SUFFIX = "_schema"


def subclasses(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *subclasses(cls)]
    return found


def find_schemas(package: str, base: type) -> dict[str, type]:
    """Every `base` subclass in `package`'s `*_schema.py` modules, by its module's name."""
    pkg = importlib.import_module(package)
    for module in pkgutil.iter_modules(pkg.__path__):
        if module.name.endswith(SCHEMA_SUFFIX):
            importlib.import_module(f"{package}.{module.name}")
    return {
        cls.__module__.rpartition(".")[2]: cls
        for cls in subclasses(base)
        if cls.__module__.endswith(SCHEMA_SUFFIX)
    }


def check_group(node) -> None:
    """Runs the checks of the schema that the composed group `node` was built from."""
    check = getattr(OmegaConf.get_type(node), "check", None)
    if check is not None:
        check(node)
