"""From a registry alias to a folder a server can load: ``models:/NAME@ALIAS`` -> version -> MLflow artifacts ->
one Hugging Face folder (weights, config, generation config, tokenizer and its chat template).

The register stage logs models with MLflow's transformers flavour, which keeps the weights under ``model/`` and the
tokenizer under ``components/tokenizer/`` (mlflow/transformers/__init__.py, ``save_model``). Servers (transformers,
vLLM) want one folder, so :func:`fetch` downloads the version once into ``<into>/v<version>/`` and assembles
``<into>/v<version>/hf/``; ``<into>/served.json`` names what is being served. A pod's init container runs it
(``llmpipe serve --fetch-only DIR``) into a volume the server container reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

SERVED = "served.json"


@dataclass
class Served:
    name: str  # registered model name: the model id clients send
    version: int
    alias: str | None
    uri: str  # models:/NAME/VERSION
    folder: str  # the assembled HF folder
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    from pipeline.registry import parse_model_uri

    return parse_model_uri(uri)


def resolve(client: Any, uri: str) -> tuple[str, int, str | None, Any]:
    """(name, version, alias, model version) of ``uri``; one line when the alias or version does not exist."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse(uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise InputError(f"{uri} does not exist in the registry ({str(exc).splitlines()[0]}); "
                         "`llmpipe lineage` lists the versions, `llmpipe promote` sets the champion") from None
    return name, int(mv.version), alias, mv


def fetch(client: Any, uri: str, into: str | os.PathLike[str], tracking_uri: str) -> Served:
    """Download ``uri``'s version into ``into`` (once: a version already there is reused) and write ``served.json``."""
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    name, version, alias, mv = resolve(client, uri)
    root = Path(into)
    target = root / f"v{version}"
    hf = target / "hf"
    if not (hf / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            # models:/ URIs go through the *registry* URI, which does not follow download_artifacts' tracking_uri
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
            except (MlflowException, OSError) as exc:
                raise InputError(f"cannot download models:/{name}/{version} from {tracking_uri}: "
                                 f"{str(exc).splitlines()[0]}") from None
            staging = Path(tmp) / "hf"
            assemble(local, staging)
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            os.replace(staging, hf)  # whole or absent: a pod killed mid-download starts again
    served = Served(name=name, version=version, alias=alias, uri=f"models:/{name}/{version}", folder=str(hf),
                    run_id=getattr(mv, "run_id", None))
    tmp_json = root / f".{SERVED}.tmp"
    tmp_json.write_text(json.dumps(served.to_json(), indent=2) + "\n")
    os.replace(tmp_json, root / SERVED)
    return served


def assemble(mlflow_model: Path, out: Path) -> None:
    """One HF folder from an MLflow transformers-flavour model: ``model/`` plus ``components/tokenizer/``."""
    model = mlflow_model / "model"
    if not (model / "config.json").exists():
        raise InputError(f"{mlflow_model} is not a transformers-flavour MLflow model (no model/config.json); "
                         "register it with the register stage")
    shutil.copytree(model, out)
    tok = mlflow_model / "components" / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file() and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    if not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists():
        raise InputError(f"{mlflow_model} has no tokenizer (components/tokenizer/); register it with its tokenizer")


def read_served(into: str | os.PathLike[str]) -> Served:
    path = Path(into) / SERVED
    if not path.exists():
        raise InputError(f"{path} does not exist: fetch a model first (llmpipe serve --fetch-only {into})")
    return Served(**json.loads(path.read_text()))
