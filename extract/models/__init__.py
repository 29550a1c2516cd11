"""Models: the zoo (:mod:`.zoo`), fetching and verifying downloads (:mod:`.fetch`), loading (:mod:`.load`) and
models derived by a rule (:mod:`.derived`). ``load_model`` and ``model_info`` are re-exported lazily, so
importing the zoo stays cheap (no torch)."""


def __getattr__(name):
    if name in ("load_model", "model_info"):
        from extract.models import load

        return getattr(load, name)
    raise AttributeError(name)
