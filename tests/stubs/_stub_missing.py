"""A callable that fails loudly: the stubs only make imports succeed."""


def missing(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"{name} is a CPU test stub (tests/stubs); install the real package")

    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn
