"""Make a tiny LM and forecasting workdir + export with the current code, and record their outputs."""
import json, shutil, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "tests")
from helpers import tiny_overrides
from jaxeff.config import load_config
from jaxeff.train import train
from jaxeff.infer import export_checkpoint, load_inference_model, generate_text
from jaxeff.infer.forecast import forecast_from_workdir

out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
expected = {}
# LM: 2-layer attention + lightning, byte tokenizer
lm = tiny_overrides(**{"model.d_model": 16, "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_dim": 32,
                       "model.mixer_pattern": "[attention,lightning]", "model.lightning.block_size": 16,
                       "train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 1, "train.eval_every": 2,
                       "checkpoint.async_save": False, "mesh.data": 1})
res = train(load_config(None, lm), out / "lm_workdir")
shutil.rmtree(out / "lm_workdir" / "tb")
export_checkpoint(out / "lm_workdir", out / "lm_export")
loaded = load_inference_model(out / "lm_workdir")
expected["lm"] = {"losses": [res.losses[s] for s in sorted(res.losses)], "step": loaded.step,
                  "greedy": generate_text(loaded.model, loaded.params, loaded.tokenizer, "def ", 12, 0.0, 0, 0)}
# forecast: linear and spacetime on a synthetic series
for arch, extra in (("linear", {}), ("spacetime", {"model.d_model": 16, "model.n_layers": 1, "model.mlp_dim": 16,
                                                    "model.companion.state_dim": 8, "model.companion.n_kernels": 4,
                                                    "model.spacetime.ma_windows": "[4]"})):
    fc = [f"{k}={v}" for k, v in {"task": "forecast", "forecast.source": "synthetic_ar", "forecast.lookback": 24,
                                   "forecast.horizon": 6, "model.architecture": arch, "train.steps": 4,
                                   "train.warmup_steps": 1, "train.global_batch_size": 8, "checkpoint.every": 2,
                                   "checkpoint.keep": 1, "train.eval_every": 2, "checkpoint.async_save": False,
                                   "logging.progress_bar": False, "mesh.data": 1, **extra}.items()]
    res = train(load_config(None, fc), out / f"{arch}_workdir")
    shutil.rmtree(out / f"{arch}_workdir" / "tb")
    export_checkpoint(out / f"{arch}_workdir", out / f"{arch}_export")
    f = forecast_from_workdir(out / f"{arch}_workdir")
    expected[arch] = {"losses": [res.losses[s] for s in sorted(res.losses)], "step": f.step,
                      "forecast": np.asarray(f.forecast_HO).tolist(), "overrides": fc}
expected["lm"]["overrides"] = lm
(out / "expected.json").write_text(json.dumps(expected, indent=1))
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "overrides"} for k, v in expected.items()}, indent=1)[:3000])
