"""The stages of `dsel run`, each a call into another stage's Python API with the paths filled in.

    tokenize                      pool, target and validation sets -> Megatron datasets (+ domains)
    prior                         proxy/prior LM trained on the pool
    pds/proxy, pds/solve, pds/fit, pds/score, pds/select
    color/finetune, color/score, color/select
    cond-only/select              the conditional-only baseline (-loss_cond of color/score)
    dsir/score, dsir/select       DSIR keys from the data-selection package, the same token budget
    random/select                 random windows with the same token budget
    pretrain/<arm>, eval/<arm>    one model per arm (each method and random), held-out losses, lm-eval;
                                  pretrain/rho-down selects its batches online from the pool
    report                        HTML page + PNGs
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from dsel.config import from_dict, save_config, to_dict
from dsel.errors import DselError
from dsel.io import read_json, write_json
from dsel.pipeline.config import BUNDLED, UNTIL_ORDER, PipelineConfig
from dsel.pipeline.runner import StageRunner
from dsel.train.config import padded_vocab_size

log = logging.getLogger(__name__)

PLACEHOLDER = "<set by dsel run>"


def merged(*settings: dict) -> dict:
    """Deep merge of nested setting dicts, later ones winning."""
    out: dict = {}
    for part in settings:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def build(cls: type, settings: dict, section: str):
    """A stage config from settings, errors naming the pipeline section they came from."""
    return from_dict(cls, settings, f"run config: {section}")


def stage_configs() -> dict[str, type]:
    """Config class of every stage the pipeline drives (imported lazily: they pull in torch)."""
    from dsel.color.commands import ColorFinetuneConfig, ColorScoreConfig
    from dsel.pds.commands import FitScorerConfig, ScoreConfig, SolveConfig
    from dsel.select.commands import SelectConfig
    from dsel.train.config import TrainConfig

    return {"train": TrainConfig, "pds.solve": SolveConfig, "pds.fit": FitScorerConfig, "pds.score": ScoreConfig,
            "color.finetune": ColorFinetuneConfig, "color.score": ColorScoreConfig, "select": SelectConfig}


def default_target_kind() -> str:
    """The solve's default scorer-target kind, named in its stage settings (and so in its DONE.json)."""
    from dsel.pds.solver import SolverConfig

    return SolverConfig().target_kind


class Pipeline:
    """One run of `dsel run`: the stages in order, under one StageRunner."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.runner = StageRunner(cfg.run_dir)
        self.data = self.runner.path("tokenize")

    # ---- settings of each stage -----------------------------------------------------------------
    def arms(self) -> list[str]:
        """The pretraining arms: each selection method, then random."""
        return [*self.cfg.methods, "random"]

    def uses_color_scores(self) -> bool:
        """color, cond-only and rho-down all need the conditional model's scores of the pool."""
        return bool({"color", "cond-only", "rho-down"} & set(self.cfg.methods))

    def stops_before(self, phase: str) -> bool:
        """Whether `until` ends the run before `phase` (finetune < score < select < report)."""
        return UNTIL_ORDER.index(self.cfg.until) < UNTIL_ORDER.index(phase)

    def select_amount(self, settings: dict, budget: int) -> dict:
        """How much a selection keeps: the token budget, or for color-batch tau = 1/budget (its n of tau*n)."""
        if settings.get("method") == "color-batch":
            if settings.get("tau") is not None:
                raise DselError(f"run config: color.select.tau={settings['tau']}: under dsel run the budget sets "
                                f"tau (1/budget = {1 / self.cfg.budget:g}); remove tau")
            return {"tau": 1.0 / self.cfg.budget, "token_budget": 0}
        return {"token_budget": budget}

    def train_settings(self, section: dict, vocab_size: int, **paths) -> dict:
        """`dsel train` settings: the shared model, a section's settings, the pipeline's paths."""
        model = merged(self.cfg.model, {"arch": {"vocab_size": vocab_size}})
        return merged({"seed": self.cfg.seed, "device": self.cfg.device}, model, section, paths)

    def stage_settings(self, vocab_size: int = 0, window: int = 0, budget: int = 0) -> dict[str, tuple[str, dict]]:
        """(config kind, settings) of every configurable stage; paths are placeholders until known."""
        cfg, data, p = self.cfg, self.data, PLACEHOLDER
        pool, target = str(data / "pool"), str(data / "target")
        valid_target = str(data / "valid" / cfg.data.target_valid)
        device = {"device": cfg.device}
        out = {
            "prior": ("train", self.train_settings(cfg.prior, vocab_size, data=[pool], valid=valid_target,
                                                   out=str(self.runner.path("prior")))),
        }
        select = {"corpus": pool, "token_budget": budget, "seed": cfg.seed, "window": window}
        if "pds" in cfg.methods:
            out["pds/solve"] = ("pds.solve", merged(device, {"solver": {"target_kind": default_target_kind()}}, cfg.pds.solve, {
                "model": p, "proxy": p, "target": target, "num_target": cfg.pds.target_windows, "out": p,
                "window": window}))
            out["pds/fit"] = ("pds.fit", merged(device, cfg.pds.fit, {"gamma": p, "out": p}))
            out["pds/score"] = ("pds.score", merged(device, cfg.pds.score, {"corpus": pool, "model": p, "out": p,
                                                                            "window": window}))
            out["pds/select"] = ("select", merged(cfg.pds.select, select, {"scores": p, "out": p}))
        if self.uses_color_scores():
            out["color/finetune"] = ("color.finetune", merged(device, cfg.color.finetune,
                                                              {"prior": p, "target": target, "out": p}))
            out["color/score"] = ("color.score", merged(device, cfg.color.score, {
                "corpus": pool, "prior": p, "cond": p, "out": p, "window": window}))
        if "color" in cfg.methods:
            out["color/select"] = ("select", merged(cfg.color.select, select, self.select_amount(cfg.color.select, budget),
                                                    {"scores": p, "out": p}))
        if "cond-only" in cfg.methods:
            out["cond-only/select"] = ("select", merged(select, {"method": "topk", "column": "-loss_cond", "scores": p,
                                                                 "out": p}))
        if "dsir" in cfg.methods:
            out["dsir/select"] = ("select", merged(select, {"method": "topk", "column": "", "scores": p, "out": p}))
        out["random/select"] = ("select", merged(select, {"method": "random", "column": "", "scores": p, "out": p}))
        for arm in self.arms():
            out[f"pretrain/{arm}"] = ("train", self.train_settings(cfg.pretrain, vocab_size, data=[p], valid=valid_target,
                                                                   out=p))
        if "rho-down" in cfg.methods:  # trains on the pool, choosing each batch online
            out["pretrain/rho-down"][1]["data"] = [pool]
        return out

    def rho_down_tau(self) -> float:
        return self.cfg.baselines.rho_down_tau or 1.0 / self.cfg.budget

    def check(self) -> None:
        """Build every stage's config from its settings now, so typos and impossible method/budget
        combinations fail before hours of work (selections are checked with a token budget in place)."""
        from dsel.select.commands import check_settings

        if not self.cfg.methods:
            raise DselError("run config: 'methods' is empty; choose pds, color or both")
        if len(set(self.cfg.methods)) != len(self.cfg.methods):
            raise DselError(f"run config: methods={self.cfg.methods} lists an arm twice")
        if not 0 < self.cfg.budget <= 1:
            raise DselError(f"run config: budget={self.cfg.budget} must be in (0, 1] (a share of the pool's tokens)")
        classes = stage_configs()
        validation_inputs(self.cfg.data)
        for name, (kind, settings) in self.stage_settings(vocab_size=self.cfg.data.vocab_size, budget=1).items():
            stage = build(classes[kind], settings, name)
            if kind == "select":
                try:
                    check_settings(stage)
                except DselError as e:
                    raise DselError(f"run config: {name}: {e}") from None
        if "rho-down" in self.cfg.methods:
            pretrain = build(classes["train"], self.stage_settings(self.cfg.data.vocab_size)["pretrain/rho-down"][1],
                             "pretrain/rho-down")
            if pretrain.backend != "torch":
                raise DselError("run config: rho-down selects each batch online with the torch backend; "
                                "set pretrain.backend=torch or drop rho-down")
            if self.rho_down_tau() < 1:
                raise DselError(f"run config: baselines.rho_down_tau={self.rho_down_tau()} must be >= 1")

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage in order (finished ones skipped); returns the results table."""
        self.check()
        save_config(self.cfg, self.runner.run_dir / "config.yaml")
        self.tokenize()
        meta = read_json(self.data / "pool.meta.json")
        vocab_size = padded_vocab_size(meta["vocab_size"])
        settings = self.stage_settings(vocab_size)
        prior = self.train("prior", settings["prior"][1], after=["tokenize"])
        window = read_json(prior / "config.json")["model"]["seq_len"] + 1
        budget = int(self.cfg.budget * (meta["num_tokens"] // window) * window)
        settings = self.stage_settings(vocab_size, window, budget)
        scores: dict[str, Path] = {}  # score table (or .npy) of each scorer, keyed by its stage prefix
        if "pds" in self.cfg.methods:
            scores["pds"] = self.pds(settings, prior, window)
        if self.uses_color_scores():
            scores["color"] = self.color(settings, prior)
        if "dsir" in self.cfg.methods and not self.stops_before("score"):
            scores["dsir"] = self.dsir(window)
        if self.stops_before("select"):
            return self.stop_early()
        for arm, scorer in (("cond-only", "color"), ("dsir", "dsir")):
            if arm in self.cfg.methods:
                self.select(arm, settings, scores[scorer], after=[f"{scorer}/score"])
        base = next(k for k in ("color", "pds", "dsir") if k in scores)
        self.select("random", settings, scores[base], after=[f"{base}/score"])
        if self.stops_before("report"):
            return self.stop_early()
        for arm in self.arms():
            if arm == "rho-down":
                self.pretrain_rho_down(settings, scores["color"], window)
            else:
                self.train(f"pretrain/{arm}", merged(settings[f"pretrain/{arm}"][1], {
                    "data": [str(self.runner.path(f"{arm}/select") / "data" / "selected")],
                    "out": str(self.runner.path(f"pretrain/{arm}"))}), after=["tokenize", f"{arm}/select"])
            self.evaluate(arm)
        results = self.results()
        write_json(self.runner.run_dir / "results.json", results)
        self.report()
        return results

    def stop_early(self) -> dict:
        """The end of a run cut short by `until`: the report of what exists, no results."""
        self.report()
        log.info("until=%s: stopping here; run again with until=report to continue", self.cfg.until)
        return {"target": self.cfg.data.target_valid, "arms": {}, "timings": self.runner.timings()}

    def dsir(self, window: int) -> Path:
        """DSIR keys of every pool window from the data-selection package (raw pool and target text)."""
        from dsel.data.readers import input_files
        from dsel.select.dsir import write_dsir_scores

        data = self.cfg.data
        pool_files = input_files(resolve_input(data.pool, "pool.jsonl.gz"))  # as the tokenize stage read them
        target_files = input_files(resolve_input(data.target, "target.jsonl.gz"))
        settings = {"pool": [f.url for f in pool_files], "target": [f.url for f in target_files], "window": window,
                    "seed": self.cfg.seed,
                    "text_field": data.text_field, "id_field": data.id_field}
        out = self.runner.run("dsir/score", settings, ["tokenize"], lambda out: write_dsir_scores(
            str(self.data / "pool"), pool_files, target_files, window, out, self.cfg.seed, data.text_field,
            data.id_field, self.cfg.baselines.dsir_workers))
        return out / "scores.npy"

    def pretrain_rho_down(self, settings: dict, color_scores: Path, window: int) -> Path:
        """RHO-down: pretrain on the pool, each step keeping the n of tau*n random windows with the largest
        loss_current - loss_cond (the model in training scores them; loss_cond from color/score)."""
        from dsel.data.corpus import open_corpus
        from dsel.data.windows import Windows
        from dsel.select.rho_down import RhoDownBatches, conditional_losses
        from dsel.train.config import TrainConfig
        from dsel.train.torch_backend import train

        name = "pretrain/rho-down"
        train_settings = merged(settings[name][1], {"out": str(self.runner.path(name))})

        def body(_: Path) -> None:
            cfg = build(TrainConfig, train_settings, name)
            windows = Windows(open_corpus(str(self.data / "pool")), window)
            batches = RhoDownBatches(windows, conditional_losses(str(color_scores), len(windows)), cfg.batch_size,
                                     cfg.grad_accum, self.rho_down_tau(), cfg.seed, cfg.precision)
            train(cfg, online_batches=batches)

        out = self.runner.run(name, {**train_settings, "rho_down_tau": self.rho_down_tau()},
                              ["tokenize", "color/score"], body)
        return out / "model"

    def tokenize(self) -> None:
        """Pool (training its tokenizer), target and validation sets -> Megatron datasets."""
        self.runner.run("tokenize", to_dict(self.cfg.data), [], self._tokenize, reads=self.input_files())

    def input_files(self) -> list[str]:
        """Every file the run reads from outside (pool, target, validation sets, a given tokenizer): their
        content is in the tokenize stage's key."""
        from dsel.data.readers import input_files

        data = self.cfg.data
        inputs = [resolve_input(data.pool, "pool.jsonl.gz"), resolve_input(data.target, "target.jsonl.gz"),
                  *validation_inputs(data).values()]
        tokenizer = Path(data.tokenizer) if data.tokenizer else None
        tokenizer_files = sorted(tokenizer.rglob("*") if tokenizer.is_dir() else [tokenizer]) if tokenizer else []
        return [f.url for path in inputs for f in input_files(path)] + [str(f) for f in tokenizer_files if f.is_file()]

    def _tokenize(self, out: Path) -> None:
        from dsel.data.tokenize import TokenizeConfig, tokenize_corpus

        data = self.cfg.data
        common = {"text_field": data.text_field, "id_field": data.id_field, "workers": data.workers}
        pool = resolve_input(data.pool, "pool.jsonl.gz")
        meta = tokenize_corpus(TokenizeConfig(input=pool, out=str(out / "pool"), vocab_size=data.vocab_size,
                                              tokenizer=data.tokenizer, domain_field=data.domain_field, **common))
        inputs = {"target": resolve_input(data.target, "target.jsonl.gz"), **validation_inputs(data)}
        for name, path in inputs.items():
            prefix = out / name if name == "target" else out / "valid" / name
            tokenize_corpus(TokenizeConfig(input=path, out=str(prefix), tokenizer=meta["tokenizer"], **common))

    def train(self, name: str, settings: dict, after: list[str]) -> Path:
        """A `dsel train` run as a stage; returns its checkpoint directory."""
        from dsel.train.commands import run_train
        from dsel.train.config import TrainConfig

        out = self.runner.run(name, settings, after, lambda _: run_train(build(TrainConfig, settings, name)))
        return out / "model"

    def pds(self, settings: dict, prior: Path, window: int) -> Path:
        """Proxy sample -> solve -> fit the scorer -> score the pool -> select; returns the score dir."""
        from dsel.pds.commands import ProxyConfig, run_fit_scorer, run_proxy, run_score, run_solve

        classes = stage_configs()
        proxy_settings = {"corpus": str(self.data / "pool"), "windows": self.cfg.pds.proxy_windows,
                          "seed": self.cfg.seed, "window": window}
        proxy = self.runner.run("pds/proxy", proxy_settings, ["tokenize", "prior"],
                                lambda out: run_proxy(build(ProxyConfig, {**proxy_settings, "out": str(out)},
                                                            "pds/proxy")))
        solve_settings = merged(settings["pds/solve"][1], {"model": str(prior), "proxy": str(proxy / "proxy"),
                                                            "out": str(self.runner.path("pds/solve"))})
        solve = self.runner.run("pds/solve", solve_settings, ["pds/proxy"],
                                lambda _: run_solve(build(classes["pds.solve"], solve_settings, "pds/solve")))
        fit_settings = merged(settings["pds/fit"][1], {"gamma": str(solve),
                                                        "out": str(self.runner.path("pds/fit") / "scorer")})
        fit = self.runner.run("pds/fit", fit_settings, ["pds/solve"],
                              lambda _: run_fit_scorer(build(classes["pds.fit"], fit_settings, "pds/fit")))
        if self.stops_before("score"):  # until=finetune: the scorer is ready for a torchrun scoring job
            return None
        score_settings = merged(settings["pds/score"][1], {"model": str(fit / "scorer"),
                                                            "out": str(self.runner.path("pds/score"))})
        scores = self.runner.run("pds/score", score_settings, ["pds/fit"],
                                 lambda _: run_score(build(classes["pds.score"], score_settings, "pds/score")))
        if not self.stops_before("select"):
            self.select("pds", settings, scores, after=["pds/score"])
        return scores

    def color(self, settings: dict, prior: Path) -> Path:
        """Fine-tune the prior on the target -> score the pool -> select; returns the score dir."""
        from dsel.color.commands import run_finetune, run_score

        classes = stage_configs()
        finetune_settings = merged(settings["color/finetune"][1], {
            "prior": str(prior), "out": str(self.runner.path("color/finetune") / "model")})
        cond = self.runner.run("color/finetune", finetune_settings, ["tokenize", "prior"], lambda _: run_finetune(
            build(classes["color.finetune"], finetune_settings, "color/finetune")))
        if self.stops_before("score"):
            return None
        score_settings = merged(settings["color/score"][1], {"prior": str(prior), "cond": str(cond / "model"),
                                                              "out": str(self.runner.path("color/score"))})
        scores = self.runner.run("color/score", score_settings, ["color/finetune"],
                                 lambda _: run_score(build(classes["color.score"], score_settings, "color/score")))
        if "color" in self.cfg.methods and not self.stops_before("select"):
            self.select("color", settings, scores, after=["color/score"])
        return scores

    def select(self, arm: str, settings: dict, scores: Path, after: list[str]) -> Path:
        """`dsel select` on a score table with the pipeline's token budget."""
        from dsel.select.commands import SelectConfig, run_select

        name = f"{arm}/select"
        select_settings = merged(settings[name][1], {"scores": str(scores), "out": str(self.runner.path(name))})

        def body(out: Path) -> None:
            run_select(build(SelectConfig, select_settings, name))

        return self.runner.run(name, select_settings, after, body)

    def evaluate(self, arm: str) -> Path:
        """Held-out loss per validation set and lm-eval tasks of one pretrained model."""
        ev = to_dict(self.cfg.eval)
        return self.runner.run(f"eval/{arm}", ev, ["tokenize", f"pretrain/{arm}"], lambda out: self._evaluate(arm, out))

    def _evaluate(self, arm: str, out: Path) -> None:
        from dsel.eval.commands import EvalLossConfig, LmEvalConfig, run_lm_eval, run_loss

        checkpoint = str(self.runner.path(f"pretrain/{arm}") / "model")
        sets = {name: str(self.data / "valid" / name) for name in validation_inputs(self.cfg.data)}
        run_loss(EvalLossConfig(model=checkpoint, data=sets, out=str(out / "heldout_loss.json"),
                                batch_size=self.cfg.eval.batch_size, max_batches=self.cfg.eval.max_batches,
                                device=self.cfg.device))
        if self.cfg.eval.lm_eval_tasks:
            run_lm_eval(LmEvalConfig(model=checkpoint, tasks=list(self.cfg.eval.lm_eval_tasks),
                                     builtin_tasks=self.cfg.eval.builtin_tasks, device=self.cfg.device,
                                     batch_size=self.cfg.eval.batch_size, out=str(out / "lm_eval.json")))

    def results(self) -> dict:
        """Per arm: target loss, every held-out loss, lm-eval metrics, tokens selected."""
        rows = {}
        for arm in self.arms():
            ev = self.runner.path(f"eval/{arm}")
            losses = read_json(ev / "heldout_loss.json")["losses"]
            selection = self.runner.path(f"{arm}/select") / "selection.json"  # rho-down selects online: none
            row = {"target_loss": losses[self.cfg.data.target_valid]["loss"],
                   "mean_loss": float(np.mean([v["loss"] for v in losses.values()])),
                   "losses": {k: v["loss"] for k, v in losses.items()},
                   "tokens_selected": read_json(selection)["tokens_kept"] if selection.is_file() else None}
            row["stderr"] = {k: v.get("stderr") for k, v in losses.items()}
            if (ev / "lm_eval.json").is_file():
                lm = read_json(ev / "lm_eval.json")["results"]
                row["lm_eval"] = {task: {k: v for k, v in m.items() if isinstance(v, float) and "stderr" not in k}
                                  for task, m in lm.items()}
                row["lm_eval_stderr"] = {task: {k.replace("_stderr", ""): v for k, v in m.items()
                                                if isinstance(v, float) and "_stderr" in k} for task, m in lm.items()}
            rows[arm] = row
        from dsel.eval.report import data_efficiency

        for arm, efficiency in data_efficiency(self.runner.run_dir, list(rows)).items():
            rows[arm]["data_efficiency"] = efficiency
        results = {"target": self.cfg.data.target_valid, "arms": rows, "timings": self.runner.timings()}
        if "pds" in self.cfg.methods:
            fit = read_json(self.runner.path("pds/fit") / "scorer" / "meta.json")["pds_fit"]
            results["pds_scorer"] = {"target_kind": fit["target_kind"], "val_spearman": fit["val"]["spearman"],
                                     "val_pearson": fit["val"]["pearson"], "best_step": fit["best_step"]}
        return results

    def report(self) -> Path:
        """The HTML report of the run (always rewritten: it is cheap)."""
        from dsel.eval.report import write_report

        return write_report(self.runner.run_dir, self.runner.path("report"))


def resolve_input(path: str, bundled_name: str) -> str:
    """A corpus path, with 'bundled' meaning the file shipped in dsel/data/bundled."""
    return str(BUNDLED / bundled_name) if path == "bundled" else path


def validation_inputs(data) -> dict[str, str]:
    """name -> file of every validation set (the bundled per-domain sets when none are given)."""
    if data.valid:
        sets = dict(data.valid)
    elif data.pool == "bundled":
        sets = {p.name.split(".")[0]: str(p) for p in sorted((BUNDLED / "valid").glob("*.jsonl.gz"))}
    else:
        raise DselError("run config: data.valid is empty; name at least the target's validation set")
    if data.target_valid not in sets:
        raise DselError(f"run config: data.target_valid={data.target_valid!r} is not one of data.valid "
                        f"({', '.join(sets)})")
    return sets
