"""Loading the model a command names: a user's Python file (this runs the file's code, as `python FILE` would),
`timm:NAME` (timm's architecture, randomly initialised, or with `--checkpoint FILE`'s weights: nothing is
downloaded) or `hf:DIR` (a Hugging Face image classifier saved locally with `save_pretrained`).

Which model a file gives, in order:
  1. `--factory FUNC`: the result of calling `FUNC()`;
  2. `--model NAME`: the object `NAME` (an nn.Module instance, or a class or function called with no arguments);
  3. a module-level variable named `model`;
  4. the only nn.Module instance at module level;
  5. the only nn.Module subclass defined in the file, instantiated with no arguments.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

from torch import nn

from spot_compile.errors import ModelFileError


def load_model_file(path: str | Path, model: str | None = None, factory: str | None = None,
                    checkpoint: str | Path | None = None) -> nn.Module:
    """The model `path` names (a file, `timm:NAME` or `hf:DIR`); `checkpoint`: weights for a timm model."""
    text = str(path)
    if text.startswith("timm:"):
        return _timm_model(text[len("timm:"):], checkpoint)
    if text.startswith("hf:"):
        if checkpoint is not None:
            raise ModelFileError("--checkpoint gives a timm model its weights; an hf:DIR folder holds its own")
        return _hf_model(Path(text[len("hf:"):]))
    if checkpoint is not None:
        raise ModelFileError("--checkpoint gives a named timm model its weights (timm:NAME --checkpoint FILE); a model "
                             "file builds and loads its own")
    module = _run_file(Path(path))
    if factory:
        fn = getattr(module, factory, None)
        if not callable(fn):
            raise ModelFileError(f"{path} has no function {factory!r}; check --factory")
        return _call(fn, f"{factory}()", path)
    if model:
        if not hasattr(module, model):
            raise ModelFileError(f"{path} defines nothing named {model!r}; check --model")
        return _as_module(getattr(module, model), model, path)
    if isinstance(getattr(module, "model", None), nn.Module):
        return module.model
    instances = {k: v for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")}
    if len(instances) == 1:
        return next(iter(instances.values()))
    if len(instances) > 1:
        raise ModelFileError(f"{path} defines several models ({', '.join(sorted(instances))}); pick one with --model NAME")
    classes = {k: v for k, v in vars(module).items()
               if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__}
    if len(classes) == 1:
        name, cls = next(iter(classes.items()))
        return _call(cls, f"{name}()", path)
    if len(classes) > 1:
        raise ModelFileError(f"{path} defines several nn.Module classes ({', '.join(sorted(classes))}); pick one with --model NAME")
    if hasattr(module, "model"):
        raise ModelFileError(f"`model` in {path} is a {type(module.model).__name__}, not an nn.Module; assign the model "
                             "itself, or name another with --model NAME / --factory FUNC")
    raise ModelFileError(
        f"{path} defines no model; add a module-level `model = ...`, or pass --model NAME / --factory FUNC"
    )


def _timm_model(name: str, checkpoint) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelFileError("naming a timm model needs timm: pip install timm") from None
    if not name or name.split(".")[0] not in timm.list_models():
        raise ModelFileError(f"timm has no model {name!r}; name one as timm:deit_tiny_patch16_224 "
                             "(python -c \"import timm; print(timm.list_models('deit*'))\" lists them)")
    model = timm.create_model(name, pretrained=False)  # nothing is downloaded: weights come from --checkpoint
    if checkpoint is not None:
        from spot_compile.serialization.checkpoints import load_tensors

        state = load_tensors(checkpoint)
        for key in ("state_dict", "model", "state"):  # training scripts nest the weights under one of these
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{checkpoint} does not hold timm {name}'s weights ({str(e).splitlines()[0][:160]}); "
                                 "pass the checkpoint of that architecture") from None
    return model.eval()


def _hf_model(folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"hf:{folder} is not a folder written by save_pretrained (no config.json there); name a "
                             "local folder: nothing is downloaded")
    try:
        import transformers
    except ImportError:
        raise ModelFileError("naming a Hugging Face model needs transformers: pip install transformers") from None
    try:
        return transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"hf:{folder} cannot be loaded as an image classifier ({str(e).splitlines()[0][:160]})") from None


def _run_file(path: Path):
    if not path.is_file():
        named = path.suffix != ".py" and "/" not in str(path)
        hint = f"; to name a model, write timm:{path} or hf:FOLDER" if named else ""
        raise ModelFileError(f"model file not found: {path}{hint}")
    name = f"spot_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelFileError(f"syntax error in {path} line {e.lineno}: {e.msg}; fix the file and retry") from None
    except SystemExit as e:
        raise ModelFileError(f"the model file {path} called sys.exit({e.code!r}) while it was run to build the model; "
                             "build the model without exiting (keep command-line code under `if __name__ == \"__main__\":`)") from None
    except Exception as e:
        raise ModelFileError(f"running {path} failed: {_where(e, path)}; fix the file and retry") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _as_module(obj, name: str, path) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        return _call(obj, f"{name}()", path)
    raise ModelFileError(f"{name!r} in {path} is a {type(obj).__name__}, not an nn.Module or a function returning one")


def _call(fn, what: str, path) -> nn.Module:
    try:
        inspect.signature(fn).bind()
    except TypeError as e:  # the call itself lacks arguments; a TypeError raised inside fn is fn's own bug, below
        raise ModelFileError(f"{what} in {path} needs arguments ({e}); add a factory without arguments and pass --factory") from None
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    try:
        result = fn()
    except Exception as e:
        raise ModelFileError(f"{what} in {path} raised {_where(e, path)}; fix it and retry") from e
    if not isinstance(result, nn.Module):
        raise ModelFileError(f"{what} in {path} returned a {type(result).__name__}, not an nn.Module")
    return result


def _where(e: Exception, path) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    line = f" (line {frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{line}"
