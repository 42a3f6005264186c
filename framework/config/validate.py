"""`validate_config(cfg)`: the composed config checked once, every problem one line naming the key.

The config is resolved (interpolations, `${oc.env:...}`) and converted to plain containers, then
validated by :class:`framework.config.root.RootConfig`. The first problem becomes one
:class:`MPQError`: `search.sharpness.name='foo' is invalid: choose one of none, sam, asam, asga`,
`train.optim.lrr=0.1 is not a config key ...`, `data.ffcv is missing ...`.
"""

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from framework.config.root import RootConfig
from framework.errors import MPQError


def validate_config(cfg: DictConfig) -> None:
    """Raise an :class:`MPQError` for the first value of `cfg` its schema refuses (types, ranges,
    allowed values, unknown or missing keys, checks across keys); return None if all are valid."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "the config"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MPQError(f"{key} cannot be resolved: {reason}") from None
    data.pop("hydra", None)
    try:
        RootConfig.model_validate(data)
    except ValidationError as err:
        raise MPQError(_line(err.errors()[0], data)) from None


def _show(value: Any) -> str:
    """A value as the error shows it: YAML's null/true/false, repr otherwise (strings quoted)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _key(loc: tuple, data: Any) -> list[str]:
    """The config path of a pydantic error location: the parts that are keys of the data (pydantic
    adds a union's tag, e.g. `slurm` in `launcher.slurm.partition`), and the last part always."""
    parts, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif i == len(loc) - 1:
            parts.append(str(part))
    return parts


def _known_keys(path: list[str], data: Any) -> list[str]:
    """The keys the schema declares at `path` (to suggest after an unknown key), or [] if unsure."""
    model: Any = RootConfig
    node = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_of(field.annotation, node)
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_of(annotation: Any, node: Any) -> Any:
    """The schema class behind a field's annotation (Optional, Annotated, a union tagged by `name`)."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    candidates = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(candidates) > 1 and isinstance(node, dict):
        named = [c for c in candidates if node.get("name") in get_args(c.model_fields["name"].annotation)]
        candidates = named or candidates
    return candidates[0] if len(candidates) == 1 else None


def _flatten(annotation: Any) -> list[Any]:
    from typing import get_args

    args = get_args(annotation)
    return [annotation] if not args else [leaf for arg in args for leaf in _flatten(arg)]


def _line(error: dict[str, Any], data: dict[str, Any]) -> str:
    path = _key(error["loc"], data)
    key = ".".join(path)
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "mpq_sentence":
        return str(ctx["text"])
    if kind == "mpq_invalid":
        if ctx.get("field"):
            key, value = ".".join([*path, ctx["field"]]), ctx["value"]
        else:
            value = error["input"]
        return f"{key}={_show(value)} is invalid: {ctx['expected']}"
    if kind == "missing":
        return f"{key} is missing from the config: every key is declared in conf/ (was it removed with ~{key}?)"
    if kind == "extra_forbidden":
        known = _known_keys(path[:-1], data)
        where = f"; {'.'.join(path[:-1]) or 'the config'} has: {', '.join(known)}" if known else ""
        return f"{key}={_show(error['input'])} is not a config key (a typo?){where}"
    if kind == "union_tag_invalid":  # `launcher.name`, which picks the launcher's schema
        field, tags = (str(ctx.get(k, "")).replace("'", "") for k in ("discriminator", "expected_tags"))
        return f"{key}.{field}={_show(ctx.get('tag'))} is invalid: choose one of {tags}"
    if kind in ("model_type", "dict_type"):
        return f"{key}={_show(error['input'])} is invalid: expected a mapping of its keys"
    return f"{key}={_show(error.get('input'))} is invalid: {error['msg']}"
