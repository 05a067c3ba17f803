"""What ``kubectl apply -k`` sends for our kustomizations, without a kustomize binary.

Renders the part of kustomize our ``kustomization.yaml`` files use (resource
files, other kustomization directories as resources, ``labels``, ``images``)
and refuses anything else, so a new kustomize
feature in a kustomization fails here instead of being rendered wrong. Where
a real kustomize is installed (``kustomize`` or ``kubectl kustomize``, v5),
tests/test_deploy.py checks that this renders exactly what it renders.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "labels", "images"}
SUPPORTED_LABEL_KEYS = {"pairs", "includeSelectors", "includeTemplates"}
SUPPORTED_IMAGE_KEYS = {"name", "newName", "newTag", "digest"}


class Unsupported(Exception):
    """The kustomization uses a kustomize feature this renderer does not implement."""


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container of every pod spec in an object, wherever its kind nests the pod template."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def image_name(image: str) -> str:
    """``registry/name:tag@digest`` -> ``registry/name``, the part kustomize's ``images[].name`` matches."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def _set_image(container: dict[str, Any], spec: dict[str, Any]) -> None:
    image = container["image"]
    name = image_name(image)
    if name != spec["name"]:
        return
    rest = image[len(name) :]
    tag = rest.split("@", 1)[0]
    digest = "@" + rest.split("@", 1)[1] if "@" in rest else ""
    if "newTag" in spec:
        tag, digest = f":{spec['newTag']}", ""
    if "digest" in spec:
        tag, digest = "", f"@{spec['digest']}"
    container["image"] = spec.get("newName", name) + tag + digest


def _template_metadata(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec", {})
    for template in (spec.get("template"), spec.get("jobTemplate", {}).get("spec", {}).get("template")):
        if isinstance(template, dict):
            yield template.setdefault("metadata", {})


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` outputs (in the kustomization's order, not kustomize's)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise Unsupported(
            f"{directory}: kustomization fields {sorted(unknown)} are not rendered by {__name__}"
        )
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir() and (path / "kustomization.yaml").is_file():
            # Another kustomization (a base, possibly ../something): what it renders.
            objects.extend(render(path))
            continue
        if not path.is_file() or not path.is_relative_to(directory.resolve()):
            raise Unsupported(
                f"{directory}: resource {resource} is neither a file inside the kustomization "
                "nor a kustomization directory"
            )
        objects.extend(copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    for entry in kustomization.get("labels", []):
        if set(entry) - SUPPORTED_LABEL_KEYS or entry.get("includeSelectors", False):
            raise Unsupported(f"{directory}: labels entry {entry} (only includeSelectors: false is rendered)")
        for obj in objects:
            targets = [obj.setdefault("metadata", {})]
            if entry.get("includeTemplates", False):
                targets.extend(_template_metadata(obj))
            for metadata in targets:
                metadata.setdefault("labels", {}).update({k: str(v) for k, v in entry["pairs"].items()})
    for spec in kustomization.get("images", []):
        if set(spec) - SUPPORTED_IMAGE_KEYS:
            raise Unsupported(f"{directory}: images entry {spec}")
        for obj in objects:
            for container in _containers(obj.get("spec")):
                _set_image(container, spec)
    return objects


def real_kustomize() -> list[str] | None:
    """The command line of an installed kustomize v5 (standalone or kubectl's), or None."""
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        result = subprocess.run(
            [kubectl, "version", "--client", "--output=json"], capture_output=True, text=True, timeout=60
        )
        version = json.loads(result.stdout).get("kustomizeVersion", "")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None
    # The `labels` field needs kustomize 4.1 or later; kubectl 1.20 embeds 2.0.
    if not re.match(r"v?([5-9]|\d\d)\.", version):
        return None
    return [kubectl, "kustomize"]


def render_with(command: list[str], directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
