"""`import jaxkv` loads the library only: not the CLI, the demo, the toy models or matplotlib."""

import subprocess
import sys


def test_import_jaxkv_loads_neither_the_demo_nor_matplotlib():
    code = (
        "import sys, jaxkv; "
        "bad = sorted(m for m in sys.modules if m.startswith(('matplotlib', 'jaxkv._cli', 'jaxkv.models'))); "
        "print(bad); assert not bad, bad; "
        "import jaxkv.models; assert jaxkv.models.TinyModel"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_public_name_has_a_docstring():
    import inspect

    import jaxkv

    missing = []
    for name in jaxkv.__all__:
        obj = getattr(jaxkv, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or attr in ("tree_flatten", "tree_unflatten"):
                    continue
                fn = member.fget if isinstance(member, property) else member
                if (inspect.isfunction(fn) or isinstance(member, (property, classmethod, staticmethod))) and not (
                    inspect.getdoc(getattr(fn, "__func__", fn))
                ):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"{len(missing)} public members without a docstring: {missing}"
