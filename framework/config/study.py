"""`study`: the rows of a transfer study (`mpq study study=<name>`, conf/study/), its seeds, the
full-precision checkpoint every row starts from, and the overrides shared by its runs.

A row's policy comes either from a policy spec (`policy`: `uniform:W/A`, `uniform-budget`,
`random` (a new `random:<seed>` per seed), `random+<n>` (`random:<seed + n>`, a second random policy per
seed), `random-best:<K>`, `hawq`, `sensitivity`, or a policy file) or from a search (`search`: a method of
conf/search/, on `proxy`: a dataset of conf/proxy/), never both.
"""

from pydantic import model_validator

from framework.config.types import Flag, Schema, Text, Texts, sentence, whole


class StudyRow(Schema):
    """One row of the study's table: where its policy comes from and its own overrides."""

    name: Text
    label: Text | None = None
    policy: Text | None = None
    search: Text | None = None
    proxy: Text | None = None
    overrides: Texts = []

    @model_validator(mode="after")
    def _one_source(self):
        if (self.policy is None) == (self.search is None):
            raise sentence(f"study row '{self.name}' needs exactly one of policy=<spec> or search=<method>")
        if self.proxy is not None and self.search is None:
            raise sentence(f"study row '{self.name}' sets proxy without a search; drop proxy or add search=<method>")
        if "/" in self.name or not self.name.strip():
            raise sentence(f"study row name {self.name!r} must be a non-empty folder name without '/'")
        return self


class StudyConfig(Schema):
    """`study`: its name, rows, seeds, starting checkpoint, shared overrides, landscape on/off, the row
    whose search compute is 1 (`reference`) and the rows every row is compared with (`baselines`)."""

    name: Text
    seeds: list[whole(0)]
    init_checkpoint: Text | None
    pretrain: Texts
    overrides: Texts
    landscape: Flag
    reference: Text | None
    baselines: Texts
    rows: list[StudyRow]
    only: Text | None
    dir: Text | None

    @model_validator(mode="after")
    def _rows(self):
        if not self.rows:
            raise sentence("study.rows is empty; list at least one row (see conf/study/smoke.yaml)")
        if not self.seeds:
            raise sentence("study.seeds is empty; give at least one seed, e.g. study.seeds=[0]")
        names = [row.name for row in self.rows]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise sentence(f"study row names must be unique; repeated: {', '.join(repeated)}")
        for key, value in (("reference", [self.reference] if self.reference else []), ("baselines", self.baselines)):
            unknown = [v for v in value if v not in names]
            if unknown:
                raise sentence(f"study.{key} names no row: {', '.join(unknown)}; rows are {', '.join(names)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise sentence(f"study.seeds={list(self.seeds)} repeats a seed")
        return self
