"""Renders a kustomization that only lists resources, as ``kubectl kustomize`` would.

A fresh CI machine has no kustomize (Debian's ``kubernetes-client`` is too old
for kustomize v5, and nothing may be downloaded but packages), so the tests
render ``deploy/kubernetes`` themselves. That is honest only while the
kustomizations use nothing but ``resources:``, whose meaning is simple: the
objects of each listed YAML file, and the build of each listed directory, in
order, with no object named twice. :func:`render` refuses any other field, so
a kustomization that starts using one fails here instead of being rendered
wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: The fields :func:`render` understands, and so the only ones deploy/kubernetes may use.
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources"})

KUSTOMIZATION_FILE = "kustomization.yaml"

#: What identifies an object in a build (kustomize refuses two with one id).
ObjectId = tuple[str, str, str, str]


class UnsupportedKustomizationError(ValueError):
    """A kustomization this renderer cannot build faithfully."""


def object_id(obj: dict[str, Any]) -> ObjectId:
    """``(apiVersion, kind, namespace, name)`` of a Kubernetes object."""
    meta = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def read_kustomization(directory: Path) -> dict[str, Any]:
    """The kustomization of ``directory``, checked to use only :data:`SUPPORTED_FIELDS`.

    Raises:
        UnsupportedKustomizationError: another field, another kind, or no resources.
    """
    path = directory / KUSTOMIZATION_FILE
    body = yaml.safe_load(path.read_text())
    if not isinstance(body, dict):
        raise UnsupportedKustomizationError(f"{path}: not a mapping")
    extra = sorted(set(body) - SUPPORTED_FIELDS)
    if extra:
        raise UnsupportedKustomizationError(
            f"{path}: uses {', '.join(extra)}; tests/deploy/kustomize.py renders only "
            f"{', '.join(sorted(SUPPORTED_FIELDS))}"
        )
    if body.get("kind") != "Kustomization" or not body.get("apiVersion", "").startswith(
        "kustomize.config.k8s.io/"
    ):
        raise UnsupportedKustomizationError(f"{path}: not a kustomize.config.k8s.io Kustomization")
    resources = body.get("resources")
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise UnsupportedKustomizationError(f"{path}: resources must be a list of paths")
    return body


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` builds, in the order listed.

    Raises:
        UnsupportedKustomizationError: see :func:`read_kustomization`; also an
            object named twice, a file that is not Kubernetes objects, or a
            resource that is a URL.
    """
    objects: list[dict[str, Any]] = []
    for entry in read_kustomization(directory)["resources"]:
        if "://" in entry or entry.startswith("git@"):
            raise UnsupportedKustomizationError(f"{directory}: remote resource {entry}")
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
                raise UnsupportedKustomizationError(
                    f"{path}: a document is not a Kubernetes object"
                )
            objects.append(doc)
    seen: set[ObjectId] = set()
    for obj in objects:
        oid = object_id(obj)
        if oid in seen:
            raise UnsupportedKustomizationError(f"{directory}: {oid} is defined twice")
        seen.add(oid)
    return objects
