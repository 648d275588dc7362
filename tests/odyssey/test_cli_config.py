"""The config tree and the CLIs generated from it: namespaced flags, short aliases, config
files, each component's checks, and the other commands built the same way."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from examples.train_gpt import parse_args
from launch.simulate import build_parser as simulate_parser
from odyssey import JobConfig, ParallelismConfig, TrainingConfig
from odyssey.job_config import SHORT_FLAGS, job_config
from planner.cli import build_parser as plan_parser
from planner.serving.cli import build_parser as plan_serve_parser
from profiler.cli import build_parser as profile_parser
from profiler.configtree import ConfigParser

SPEC = "kill:rank=3,step=25,phase=backward"


def test_short_aliases_and_namespaced_flags_give_the_same_config():
    short = parse_args(["--dp", "2", "--pp", "2", "--steps", "60", "--log-every", "10",
                        "--inject", SPEC, "--ft-policy", "reroute", "--checkpoint-every", "5",
                        "--no-resume", "--tensorboard", "--swap", "auto", "--memory-budget",
                        "512MiB", "--lr", "0.01", "--partition", "1,3", "--gpt-d-model", "32",
                        "--emu-forward-ms", "1,2", "--heartbeat-timeout-s", "2"])
    long = parse_args(["--parallelism.dp", "2", "--parallelism.pp", "2", "--training.steps",
                       "60", "--training.log-every", "10", "--fault-tolerance.inject", SPEC,
                       "--fault-tolerance.policy", "reroute", "--checkpoint.every", "5",
                       "--checkpoint.no-resume", "--metrics.tensorboard", "--swap.mode", "auto",
                       "--swap.budget", "512MiB", "--optimizer.lr", "0.01",
                       "--parallelism.partition", "1", "3", "--gpt.d-model", "32",
                       "--emu.forward-ms", "1", "2", "--monitor.heartbeat-timeout-s", "2"])
    assert short == long
    assert (short.parallelism.dp, short.parallelism.pp, short.training.steps) == (2, 2, 60)
    assert short.fault_tolerance.inject == (SPEC,) and short.fault_tolerance.policy == "reroute"
    assert short.checkpoint.every == 5 and short.checkpoint.resume is False
    assert short.metrics.tensorboard and short.swap.mode == "auto"
    assert short.swap.budget == "512MiB" and short.swap.chameleon().budget == "512MiB"
    assert short.optimizer.lr == 0.01 and short.parallelism.partition == (1, 3)
    assert short.gpt.d_model == 32 and short.emu.forward_ms == (1.0, 2.0)
    assert short.monitor.heartbeat_timeout_s == 2.0
    defaults = parse_args([])
    assert JobConfig(**{f.name: getattr(defaults, f.name) for f in fields(JobConfig)}) \
        == JobConfig()
    assert defaults.emu.forward_ms == 5.0


def test_inject_is_repeatable_and_keeps_the_commas_of_a_spec():
    cfg = parse_args(["--inject", "kill:rank=1,step=6", "--fault-tolerance.inject",
                      "hang:rank=2,step=9", "slow:rank=0,step=3,delay=1"])
    assert cfg.fault_tolerance.inject == ("kill:rank=1,step=6", "hang:rank=2,step=9",
                                          "slow:rank=0,step=3,delay=1")


def test_a_config_file_sets_any_field_and_flags_override_it(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('[training]\nsteps = 200\nmode = "emulated"\n'
                    '[parallelism]\ndp = 2\npartition = [1, 3]\n'
                    f'[fault_tolerance]\ninject = ["{SPEC}"]\nhorizon_s = 60\n'
                    '[swap]\nbudget = 4096\n[emu]\nforward_ms = [1.0, 2.0]\n')
    cfg = parse_args(["--config", str(toml), "--steps", "50", "--inject", "raise:rank=0,step=1"])
    assert cfg.training.steps == 50 and cfg.training.mode == "emulated"
    assert cfg.parallelism.dp == 2 and cfg.parallelism.partition == (1, 3)
    assert cfg.fault_tolerance.inject == ("raise:rank=0,step=1",)  # the flag replaces
    assert cfg.fault_tolerance.horizon_s == 60 and cfg.swap.budget == 4096
    assert cfg.emu.forward_ms == (1.0, 2.0)
    js = tmp_path / "job.json"
    js.write_text(json.dumps({"checkpoint": {"every": 4, "resume": False},
                              "metrics": {"progress": "off"}, "gpt": {"n_blocks": 2}}))
    cfg = parse_args(["--config", str(js)])
    assert cfg.checkpoint.every == 4 and not cfg.checkpoint.resume
    assert cfg.metrics.progress == "off" and cfg.gpt.n_blocks == 2


@pytest.mark.parametrize("text, message", [
    ("[training]\nstepz = 3\n", "unknown key 'training.stepz'; [training] has: ds_config,"),
    ("[trainingg]\nsteps = 3\n", "unknown key 'trainingg'; the top level has:"),
    ("[comm]\nhost = '10.0.0.1'\n", "unknown key 'comm.host'"),  # the launcher's address
    ("[training]\nsteps = 'many'\n", "training.steps: expected int, got 'many'"),
    ("[training]\nsteps = true\n", "training.steps: expected int, got True"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path, capsys, text, message):
    bad = tmp_path / "job.toml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(bad)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ft-policy", "bogus"], "fault_tolerance.policy must be one of"),
    (["--swap", "maybe"], "swap.mode must be one of"),
    (["--heartbeat-timeout-s", "0"], "monitor.heartbeat_timeout_s must be > 0"),
    (["--progress", "fancy"], "metrics.progress must be one of"),
    (["--mode", "fake"], "training.mode must be one of"),
    (["--schedule", "zigzag"], "training.schedule must be one of"),
    (["--steps", "x"], "invalid int value: 'x'"),
    (["--optimizer.betas", "0.9"], "takes 2 values"),
])
def test_each_component_checks_its_fields(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_namespaced_flags_with_their_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--training.steps", "--parallelism.dp", "--fault-tolerance.policy",
                 "--fault-tolerance.inject", "--checkpoint.every", "--metrics.tensorboard",
                 "--monitor.heartbeat-timeout-s", "--comm.timeout-s", "--optimizer.lr",
                 "--swap.budget", "--swap.no-recompute", "--gpt.d-model", "--emu.num-layers",
                 "--config"):
        assert flag in out, flag
    assert "Optimizer steps to train" in out and "Data-parallel pipelines" in out
    assert "--comm.host" not in out and "--swap.layers" not in out


def test_job_config_from_short_names_matches_the_nested_form():
    cfg = job_config(steps=1000, dp=2, pp=2)
    assert cfg == JobConfig(training=TrainingConfig(steps=1000),
                            parallelism=ParallelismConfig(dp=2, pp=2))  # the README's
    later = job_config(cfg, inject=("kill:rank=1,step=6",), resume=False)
    assert later.parallelism.dp == 2 and later.fault_tolerance.inject == ("kill:rank=1,step=6",)
    assert not later.checkpoint.resume and cfg.checkpoint.resume
    with pytest.raises(TypeError, match="unknown field 'stepz'"):
        job_config(stepz=1)
    with pytest.raises(ValueError, match="fault_tolerance.policy"):
        job_config(ft_policy="bogus")
    # every short flag names a field of the tree
    ConfigParser(JobConfig, aliases=SHORT_FLAGS)
    with pytest.raises(ValueError, match="no field 'training.stepz'"):
        ConfigParser(JobConfig, aliases={"s": "training.stepz"})


def test_the_other_commands_generate_their_flags_the_same_way(tmp_path):
    plan = plan_parser().parse_config(["--formula", "gpt3-125m", "--nodes", "2",
                                       "--microbatch-sizes", "1,2", "--schedules",
                                       "1f1b,gpipe", "--no-unequal", "--top", "3"])
    assert plan.search.num_nodes == 2 and plan.search.microbatch_sizes == (1, 2)
    assert plan.search.schedules == ("1f1b", "gpipe") and not plan.search.unequal_pipelines
    assert plan.search.max_results == 3 and plan.memory_gb == 80.0
    serve = plan_serve_parser().parse_config(["--profile", "p.json", "--requests", "50",
                                              "--prompt-len", "8,64", "--max-running", "4"])
    cfg = serve.search_config()
    assert (cfg.trace.num_requests, cfg.trace.prompt_len, cfg.sched.max_running) == \
        (50, (8, 64), 4)
    assert cfg.slo.ttft_s == pytest.approx(0.2) and cfg.trace.rate == 4.0
    prof = profile_parser().parse_config(["--model", "emulated", "--forward-ms", "1,2,3"])
    assert prof.emulated.forward_ms == (1.0, 2.0, 3.0) and prof.emulated.backward_ms == 10.0
    assert profile_parser().parse_config(["--forward-ms", "5"]).emulated.forward_ms == 5.0
    conf = tmp_path / "sim.toml"
    conf.write_text("policies = ['adaptive', 'restart']\n[cluster]\nnum_nodes = 8\n")
    sim = simulate_parser().parse_config(["--config", str(conf), "--days", "2"])
    assert sim.policies == ("adaptive", "restart") and sim.cluster.num_nodes == 8
    assert sim.trace.days == 2.0


def test_commands_refuse_bad_values_with_status_2(capsys):
    for parser, argv, message in [
            (plan_parser(), [], "give one of --profile or --formula"),
            (plan_serve_parser(), [], "the following arguments are required: --profile"),
            (profile_parser(), ["--model", "nope"], "--model must be one of"),
            (profile_parser(), ["--inter-gbps", "1"], "give both --inter-alpha-us"),
            (simulate_parser(), ["--policies", "nope"], "--policies: unknown ['nope']")]:
        with pytest.raises(SystemExit) as e:
            parser.parse_config(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
