"""Read a conv base's weights, in Keras's `model.layers` order, from the files
they come in: a Keras .h5 weight file (what keras.applications downloads to
~/.keras/models/, or `model.save_weights`/`model.save` of Keras 2 or Keras
3's legacy format), and a Keras 3 `.keras` archive holding the base as a
nested model. Each reader returns [(layer name, [arrays])] for the layers
that have weights; `keras_arch.Net` assigns them by position, as Keras does.
Needs h5py and numpy only.
"""
import io
import json
import re
import zipfile

import h5py
import numpy as np


class WeightsError(Exception):
    pass


def _str(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def read_h5(path):
    """Keras's h5 layout: root (or `model_weights`) attr `layer_names`; each
    layer's group lists its `weight_names` in Keras's order."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e}); truncated download?") from e
    with f:
        g = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in g.attrs:
            if "layers" in g:
                raise WeightsError(f"{path}: a Keras 3 `.weights.h5` (weights by object path, no layer list); "
                                   "save it with model.save('x.h5') or pass the .keras file")
            raise WeightsError(f"{path}: no `layer_names` attribute: not a Keras weight file")
        out = []
        for name in map(_str, g.attrs["layer_names"]):
            if name not in g:
                raise WeightsError(f"{path}: layer `{name}` is listed but missing: truncated or damaged file")
            names = [_str(n) for n in g[name].attrs.get("weight_names", [])]
            if names:
                try:
                    out.append((name, [np.asarray(g[name][n], dtype=np.float32) for n in names]))
                except KeyError as e:
                    raise WeightsError(f"{path}: layer `{name}` lacks its weight {e}: damaged file") from e
        return out


def _snake(cls):
    # keras.src.utils.naming.to_snake_case: the key a .keras archive stores a layer's weights under.
    s = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", cls))
    return re.sub("([a-z])([A-Z])", r"\1_\2", s).lower()


def _keys(layers):
    """The weight-store key of each layer of a Keras 3 model's config (saving_lib's
    `_save_container_state`: class name in snake case, `_1`, `_2`... on repeats)."""
    used, keys = {}, []
    for layer in layers:
        k = _snake(layer["class_name"])
        if k in used:
            used[k] += 1
            k = f"{k}_{used[k]}"
        else:
            used[k] = 0
        keys.append(k)
    return keys


def read_keras_zip(path, base):
    """The nested model named `base` (e.g. `xception`) of a Keras 3 `.keras`
    archive: its layers from config.json, their weights from model.weights.h5.
    Refuses a base that was trainable in the saved model: its weights may
    have been trained away from the ones it was built with."""
    try:
        z = zipfile.ZipFile(path)
        config = json.loads(z.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a Keras 3 .keras archive ({e}); truncated download?") from e
    outer = config.get("config", {}).get("layers", [])
    outer_keys = _keys(outer)
    found = [(k, l) for k, l in zip(outer_keys, outer) if l.get("config", {}).get("name") == base]
    if not found:
        raise WeightsError(f"{path}: no nested model `{base}` (has: {[l['config'].get('name') for l in outer]})")
    key, model = found[0]
    layers = model["config"]["layers"]
    trainable = [l["config"]["name"] for l in layers if l["config"].get("trainable", True) and l["class_name"] != "InputLayer"]
    if model["config"].get("trainable", True) and trainable:
        raise WeightsError(f"{path}: `{base}` was trainable when saved ({trainable[:3]}...): its weights "
                           "need not be the ones it was built with")
    out = []
    try:
        raw = io.BytesIO(z.read("model.weights.h5"))
    except (KeyError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: no readable model.weights.h5 ({e})") from e
    with h5py.File(raw, "r") as f:
        for k, layer in zip(_keys(layers), layers):
            g = f.get(f"layers/{key}/layers/{k}/vars")
            if g is None or len(g) == 0:
                continue
            out.append((layer["config"]["name"], [np.asarray(g[str(i)], dtype=np.float32) for i in range(len(g))]))
    return out
