"""The trained policy as an MLflow Model: logged, registered with its tags and held-out
metrics, loaded back to generate, served over HTTP on localhost; runs named from their
configuration with their dataset inputs. Real Kedro sessions, a real sqlite store."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_RUN, scratch_project
from tests.conftest import run_kedro as run

pytestmark = pytest.mark.slow

MODEL = "fgrpo-policy"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small default run (training + evaluation) in a project copy; its store's URI."""
    with (
        pytest.MonkeyPatch.context() as patch,
        scratch_project(tmp_path_factory.mktemp("project"), patch) as project,
    ):
        training = {**SMALL_RUN["training"], "steps": 20, "checkpoint_every": 0}
        run(project, "__default__", {"training": training})
        while mlflow.active_run():  # kedro-mlflow leaves its finished run on the stack
            mlflow.end_run()
        yield project, f"sqlite:///{project}/mlflow.db"


def _client(uri):
    """The module's store as tracking and registry (``models:/`` URIs resolve there)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_the_run_logs_and_registers_the_policy_with_tags_and_metrics(trained):
    project, uri = trained
    client = _client(uri)
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    tags = version.tags
    assert {k: tags[k] for k in ("loss", "divergence", "beta", "lam", "seed")} == {
        "loss": "f_grpo",
        "divergence": "kl",
        "beta": "0.1",
        "lam": "0.5",
        "seed": "0",
    }
    assert len(tags["git_commit"]) >= 7 or tags["git_commit"] == "unknown"
    report = json.loads((project / "data/08_reporting/evaluation.json").read_text())
    for side in ("base", "trained"):
        value = float(tags[f"heldout.{side}.sampled_accuracy"])
        assert value == pytest.approx(report[side]["sampled_accuracy"], rel=1e-5)
    run_ = client.get_run(version.run_id)
    assert run_.info.run_name == "f_grpo-kl-b0.1-seed0"
    assert run_.data.tags["mlflow.note.content"].startswith("`kedro")
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run_.info.experiment_id], output_format="list"
    )
    assert model.source_run_id == run_.info.run_id
    assert {m.key for m in model.metrics} >= {"heldout.trained.sampled_accuracy"}


def test_the_registered_version_loads_back_and_generates(trained):
    _, uri = trained
    _client(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    out = model.predict(["3+4=", "1+2="])
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    assert not out[0].startswith("3+4=")  # the completion, not the prompt again


def test_the_run_is_found_by_name_with_its_dataset_inputs(trained):
    _, uri = trained
    _client(uri)
    (found,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="attributes.run_name = 'f_grpo-kl-b0.1-seed0'",
        output_format="list",
    )
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in found.inputs.dataset_inputs
    }
    assert {("prompts", "training"), ("aligned", "training"), ("unaligned", "training")} <= inputs
    assert ("prompts", "evaluation") in inputs
    for d in found.inputs.dataset_inputs:
        assert d.dataset.digest and d.dataset.source


def _free_port() -> int | None:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    except OSError:
        return None


def test_mlflow_models_serve_answers_a_generation_request(trained):
    _, uri = trained
    port = _free_port()
    if port is None:
        pytest.skip("no localhost port can be bound here")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen(
        [*mlflow_cli, "models", "serve", "-m", f"models:/{MODEL}/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not answer /ping within 120 s")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": ["3+4="]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        (completion,) = answer["predictions"]
        assert isinstance(completion, str)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_lora_policy_is_logged_as_its_adapter_and_loads_back_to_the_merged_generations(
    tmp_path,
):
    import torch

    from fgrpo_pipeline.datasets import MlflowPolicyDataset
    from fgrpo_pipeline.models.lora import LoraSettings, apply_lora, merge_for_export
    from fgrpo_pipeline.models.policy import Policy, build_char_tokenizer, build_tiny_policy
    from fgrpo_pipeline.rollout import SamplingConfig, get_engine

    base = build_tiny_policy(build_char_tokenizer())
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    policy = apply_lora(Policy(loaded, base.tokenizer), LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # a trained adapter: B ≠ 0
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lora")  # not an experiment id left over from another store
    dataset = MlflowPolicyDataset(
        save_args={"name": "policy", "task": "text-generation", "pip_requirements": ["torch"]}
    )
    with mlflow.start_run():
        dataset.save(policy)
    local = mlflow.artifacts.download_artifacts(dataset.model_info.model_uri)
    files = {p.name for p in __import__("pathlib").Path(local).rglob("*")}
    assert "adapter_config.json" in files  # the adapter ...
    assert "model.safetensors" not in files  # ... and no base weights
    flavor = dataset.model_info.flavors["transformers"]
    assert flavor.get("source_model_name") == str((tmp_path / "base").resolve())
    back = mlflow.transformers.load_model(dataset.model_info.model_uri, return_type="components")
    greedy = SamplingConfig(do_sample=False, max_new_tokens=6)
    merged = merge_for_export(policy)
    engine = get_engine("hf")
    prompts = ["1+2=", "30+4="]
    expected = engine.generate(merged, prompts, 1, greedy).completions
    reloaded = Policy(back["model"], back["tokenizer"])
    assert engine.generate(reloaded, prompts, 1, greedy).completions == expected
    mlflow.set_tracking_uri(None)
