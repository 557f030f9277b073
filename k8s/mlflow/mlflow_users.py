"""Create (or re-key) the pipeline's MLflow user on the basic-auth MLflow server.

Run by the mlflow-setup Job (k8s/mlflow/setup.yaml) in the llmpipe-mlflow image; tests/k8s/test_mlflow_auth.py
runs it against a real `mlflow server --app-name basic-auth`. Everything comes from the environment, nothing
from the command line:

  MLFLOW_TRACKING_URI                             the server
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD   an admin (Secret mlflow-auth)
  LLMPIPE_MLFLOW_USERNAME / LLMPIPE_MLFLOW_PASSWORD     the pipeline's user (Secret llmpipe-mlflow)

The user is not an admin: the auth app gives whoever creates an experiment or a registered model MANAGE on it
(mlflow/server/auth/__init__.py: set_can_manage_experiment_permission, set_can_manage_registered_model_permission),
and everyone authenticated the config's default_permission (READ) on the rest.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

from mlflow.exceptions import RestException
from mlflow.server.auth.client import AuthServiceClient


def wait_for(uri: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"MLflow at {uri} did not answer within {seconds:.0f} s: {exc}")
        print(f"waiting for MLflow at {uri}", flush=True)
        time.sleep(3)


def main() -> int:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    user = os.environ["LLMPIPE_MLFLOW_USERNAME"]
    password = os.environ["LLMPIPE_MLFLOW_PASSWORD"]
    wait_for(uri, float(os.environ.get("WAIT_SECONDS", "600")))
    client = AuthServiceClient(uri)
    try:
        client.get_user(user)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(user, password)
        print(f"MLflow user {user}: created", flush=True)
    else:
        client.update_user_password(user, password)
        print(f"MLflow user {user}: exists, password set", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
