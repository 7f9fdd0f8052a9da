"""Shared by the series scripts' summary tables (scripts/seed-series.sh, scripts/vocab-series.sh):
the sizes of the base config after its --set overrides, and the formatting of table cells."""
import statistics as st
import tomllib


def sizes(config, sets):
    """(B, T, C, L) of `config` with the `--set` overrides among `sets` (KEY=VALUE strings)."""
    cfg = tomllib.load(open(config, "rb"))
    for kv in sets:
        if "=" in kv:
            key, value = kv.split("=", 1)
            sec, _, name = key.partition(".")
            if sec in ("data", "model") and name in ("batch_size", "seq_len", "channels", "target_depth"):
                cfg[sec][name] = int(value)
    return cfg["data"]["batch_size"], cfg["data"]["seq_len"], cfg["model"]["channels"], cfg["model"]["target_depth"]


def non_embedding_params(c, l):
    """Non-embedding parameters of the fixed model: L blocks of 12 C^2 + 13 C."""
    return l * (12 * c * c + 13 * c)


def num(x):
    """A table cell ("+4.05%", "1.32×", "< 0.62×") as (value, "<" / ">" / "")."""
    x = x.strip().replace("×", "").replace("%", "").replace("+", "")
    flag = "<" if x.startswith("<") else ">" if x.startswith(">") else ""
    return float(x.lstrip("<> ").split(" ")[0]), flag


def fmt(v, unit=""):
    """Mean (min–max) of the values `v`, or the one value, or – for none."""
    if not v:
        return "–"
    m = st.mean(v)
    return f"{m:.4g}{unit} ({min(v):.4g}–{max(v):.4g})" if len(v) > 1 else f"{m:.4g}{unit}"
