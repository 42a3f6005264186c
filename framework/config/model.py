"""`model`: a name from framework.models' registry, the classifier width `mpq cost` assumes, an
optional local weights file and the builder's own keyword options."""

from framework.config.types import Mapping, Schema, Text, one_of, whole


def _models() -> list[str]:
    from framework.models import available_models

    return available_models()


class ModelConfig(Schema):
    """The model to build (its options are the registered builder's keyword arguments)."""

    name: one_of(_models)
    num_classes: whole(1)
    weights: Text | None
    options: Mapping
