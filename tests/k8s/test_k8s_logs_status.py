"""`llmpipe k8s logs` (printed and followed over a real chunked stream) and `llmpipe k8s status`."""

from __future__ import annotations

import re
import threading
import time

from tests.k8s.conftest import error_lines
from tests.k8s.fakeapi import Scenario

FAST = ("--interval", "0.1")


def _pods(fake, job: str) -> list[str]:
    return [p["metadata"]["name"] for p in fake.items("pods") if p["metadata"]["labels"].get("job-name") == job]


def test_logs_of_a_finished_sharded_stage_are_prefixed_by_pod(fake, chart, llmpipe):
    fake.scenarios["llmpipe-clean-part"] = Scenario(logs=["rank {index}: read 10 documents", "rank {index}: kept 9"])
    fake.scenarios["llmpipe-clean-merge"] = Scenario(logs=["merged 2 parts"], after="llmpipe-clean-part")
    assert llmpipe("k8s", "submit", "clean", "--wait", *FAST)[0] == 0
    rc, out, err = llmpipe("k8s", "logs", "clean")
    assert rc == 0, err
    part0, part1 = sorted(_pods(fake, "llmpipe-clean-part"))
    (merge,) = _pods(fake, "llmpipe-clean-merge")
    lines = out.splitlines()
    assert lines[:4] == [f"[{part0}] rank 0: read 10 documents", f"[{part0}] rank 0: kept 9",
                         f"[{part1}] rank 1: read 10 documents", f"[{part1}] rank 1: kept 9"]
    assert lines[4] == f"[{merge}] merged 2 parts"  # the merge after the parts, whatever the pod names
    rc, out, _ = llmpipe("k8s", "logs", "clean", "--role", "merge", "--tail", "1")
    assert rc == 0 and len(out.splitlines()) == 1
    assert out.strip() in ("merged 2 parts", "== clean [0] still working")  # one pod: no prefix


def test_logs_of_a_single_pod_have_no_prefix_and_tail_works(fake, chart, llmpipe):
    fake.scenarios["llmpipe-collect"] = Scenario(logs=[f"line {i}" for i in range(5)])
    assert llmpipe("k8s", "submit", "collect", "--wait", *FAST)[0] == 0
    rc, out, _ = llmpipe("k8s", "logs", "collect")
    assert rc == 0 and out.splitlines() == [f"line {i}" for i in range(5)]
    rc, out, _ = llmpipe("k8s", "logs", "collect", "--tail", "2")
    assert out.splitlines() == ["line 3", "line 4"]


def test_logs_of_a_pod_that_never_started_say_why(fake, chart, llmpipe):
    fake.scenarios["llmpipe-collect"] = Scenario(outcome="imagepull")
    assert llmpipe("k8s", "submit", "collect")[0] == 0
    deadline = time.monotonic() + 10
    while not fake.items("events") and time.monotonic() < deadline:
        time.sleep(0.05)
    rc, out, err = llmpipe("k8s", "logs", "collect")
    assert rc == 0 and out == ""
    (pod,) = _pods(fake, "llmpipe-collect")
    assert re.match(rf"\[{pod}\] no log: pod {pod}: cannot pull image ghcr\.io/llm-pipeline/llmpipe-data:\S+ "
                    r"\((ErrImagePull|ImagePullBackOff)\)", err), err


def test_follow_streams_every_pod_as_it_runs_and_ends_with_the_stage(fake, chart, llmpipe):
    fake.tick = 0.08
    fake.scenarios["llmpipe-clean-part"] = Scenario(logs=[f"part {{index}} step {i}" for i in range(4)])
    fake.scenarios["llmpipe-clean-merge"] = Scenario(logs=["merge starts", "merge done"], after="llmpipe-clean-part")
    assert llmpipe("k8s", "submit", "clean")[0] == 0
    t0 = time.monotonic()
    rc, out, err = llmpipe("k8s", "logs", "clean", "--follow", *FAST)
    assert rc == 0, err
    assert time.monotonic() - t0 < 30
    by_pod: dict[str, list[str]] = {}
    for line in out.splitlines():
        pod, text = re.match(r"\[(\S+)\] (.*)", line).groups()
        by_pod.setdefault(pod, []).append(text)
    part0, part1 = sorted(_pods(fake, "llmpipe-clean-part"))
    (merge,) = _pods(fake, "llmpipe-clean-merge")
    assert by_pod[part0] == [f"part 0 step {i}" for i in range(4)]
    assert by_pod[part1] == [f"part 1 step {i}" for i in range(4)]
    assert by_pod[merge][:2] == ["merge starts", "merge done"] and by_pod[merge][2:] == ["== clean [0] still working"] * (len(by_pod[merge]) - 2)
    # streamed, not read at the end: the follow requests went out while the pods ran
    follows = [q for m, path, q in fake.requests if path.endswith("/log") and "follow=true" in q]
    assert len(follows) == 3


def test_follow_of_a_failing_stage_shows_the_error_then_exits_1(fake, chart, llmpipe):
    fake.scenarios["llmpipe-collect"] = Scenario(outcome="fail", logs=["starting"], error_line="error: disk full")
    assert llmpipe("k8s", "submit", "collect")[0] == 0
    rc, out, err = llmpipe("k8s", "logs", "collect", "-f", *FAST)
    assert rc == 1
    assert sum(ln.endswith("] starting") for ln in out.splitlines()) == 2  # both attempts (backoffLimit 1)
    assert sum(ln.endswith("] error: disk full") for ln in out.splitlines()) == 2
    lines = error_lines(err)
    assert "BackoffLimitExceeded" in lines[1] and "log: error: disk full" in lines[2]


def test_follow_picks_up_pods_that_start_later(fake, chart, llmpipe):
    fake.scenarios["llmpipe-collect"] = Scenario(outcome="hang", logs=["up"])
    assert llmpipe("k8s", "submit", "collect")[0] == 0

    def finish() -> None:  # the workload ends while we follow: its log stream closes, follow returns
        time.sleep(1.0)
        job = fake.get("jobs", "llmpipe-collect")
        fake._status("jobs", "llm-pipeline", "llmpipe-collect", job["metadata"]["uid"], succeeded=1, active=0)
        fake._condition("jobs", "llm-pipeline", "llmpipe-collect", job["metadata"]["uid"], "Complete", "True", "", "")
        for pod in _pods(fake, "llmpipe-collect"):
            fake._close_logs("llm-pipeline", pod)

    threading.Thread(target=finish, daemon=True).start()
    rc, out, err = llmpipe("k8s", "logs", "collect", "-f", *FAST)
    assert rc == 0, err
    assert out.splitlines()[0].endswith("] up") and "still working" in out


def test_a_recreated_training_pod_is_followed_again_and_the_stage_still_succeeds(fake, chart, llmpipe):
    fake.tick = 0.06
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="restart", logs=["step {index}"])
    assert llmpipe("k8s", "submit", "pretrain", "--set", "nnodes=1")[0] == 0  # one pod (the shape has 8)
    rc, out, err = llmpipe("k8s", "logs", "pretrain", "-f", "--interval", "0.05")
    assert rc == 0, err
    # the first master pod's log (killed), then the recreated pod of the same name, from its start
    assert out.splitlines() == ["[llmpipe-pretrain-master-0] == pretrain [0] step 1/1", "[llmpipe-pretrain-master-0] Killed",
                                "[llmpipe-pretrain-master-0] step 0"]
    rc, out, err = llmpipe("k8s", "wait", "pretrain", *FAST)
    assert rc == 0 and "pretrain succeeded (PyTorchJob llmpipe-pretrain)" in out


def test_status_lists_every_stage_and_what_is_wrong(fake, chart, llmpipe):
    # pretrain: its Master is OOM-killed at every start. That used to fail the PyTorchJob at once (our guess);
    # the training operator v1.8.1 recreates an OOM-killed pod (exit 137, restartPolicy ExitCode) without
    # bound, so what fails it is the stage's own restart budget: the 3rd start from the same step exits 1
    # (LLMPIPE_MAX_RESTARTS = the site's backoffLimit 1)
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="oom", restart_budget=True, steps=1)
    fake.scenarios["llmpipe-tokenizer"] = Scenario(outcome="unschedulable")
    assert llmpipe("k8s", "submit", "collect", "--wait", *FAST)[0] == 0
    assert llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=1")[0] == 1
    assert llmpipe("k8s", "submit", "tokenizer", "--wait", *FAST, "--timeout", "0.5")[0] == 124
    rc, out, err = llmpipe("k8s", "status")
    assert rc == 0, err
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines()[2:] if "/llmpipe-" in ln}
    assert rows["Job/llmpipe-collect"][:5] == ["collect", "Job/llmpipe-collect", "single", "Succeeded*", "1/1"]
    assert rows["PyTorchJob/llmpipe-pretrain"][:4] == ["pretrain", "PyTorchJob/llmpipe-pretrain", "train", "Failed*"]
    assert rows["Job/llmpipe-tokenizer"][3:6] == ["Running*", "0/1", "0/1/0"]
    causes = [ln for ln in out.splitlines() if ln.startswith(("pretrain: ", "tokenizer: ", "collect: "))]
    assert causes[0] == ('pretrain: PyTorchJob llmpipe-pretrain failed: job "llmpipe-pretrain" is failing because '
                         '"Master" replica(s) failed.')
    assert causes[1].startswith("pretrain: pod llmpipe-pretrain-master-0: container pytorch exited with code 1; log: "
                                "error: pretrain: started 3 times from step 1200 without reaching a new checkpoint "
                                "(LLMPIPE_MAX_RESTARTS=1)")
    assert causes[2].startswith("tokenizer: pod llmpipe-tokenizer-") and "Unschedulable: 0/3 nodes" in causes[2]
    assert len(causes) == 3
    rc, out, _ = llmpipe("k8s", "status", "collect")
    assert "pretrain" not in out and "Job/llmpipe-collect" in out


def test_status_of_an_empty_namespace(fake, llmpipe):
    rc, out, _ = llmpipe("k8s", "status", "-n", "elsewhere")
    assert rc == 0 and out.strip() == ("no llm-pipeline stage submitted in namespace elsewhere "
                                       "(submit with `llmpipe k8s submit STAGE`)")
