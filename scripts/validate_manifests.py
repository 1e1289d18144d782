"""Validates the deployment manifests (deploy/k8s, deploy/kserve) in strict mode. Run by scripts/oip-test.sh
(part of `make test`) with kubernetes-validate and kserve installed:

- every Kubernetes resource under deploy/k8s against the Kubernetes schemas of kubernetes-validate, strict
  (unknown fields are errors), including the GPU variant: deploy/k8s/gpu's JSON patches applied to the
  Deployment, then the result validated;
- each kustomization's resources exist and are validated here;
- the KServe InferenceService against the InferenceService schema of the kserve package's models (generated from
  KServe's OpenAPI): every field must be known and of the right type, strictly;
- the ServiceMonitor (no schema of the Prometheus Operator's CRDs is on PyPI): its required fields, and that it
  selects the Service's labels and port;
- negative controls: a misspelt field in the Deployment and in the InferenceService must fail, so the
  validation can fail.

Exits 1 on the first failure.
"""

import copy
import datetime
import pathlib
import sys

import kubernetes_validate
import yaml

import checklist
from checklist import check

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/k8s"
VERSION = "1.37.0"


def k8s_errors(doc):
    try:
        kubernetes_validate.validate(doc, VERSION, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return str(e)


def load(path):
    return yaml.safe_load(path.read_text())


def apply_json_patch(doc, ops):
    """RFC 6902 `add` and `replace`, the two operations the GPU overlay uses."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if op["op"] == "add" and isinstance(target, list):
            target.append(op["value"]) if last == "-" else target.insert(int(last), op["value"])
        elif op["op"] in ("add", "replace"):
            if isinstance(target, list):
                target[int(last)] = op["value"]
            else:
                if op["op"] == "replace" and last not in target:
                    raise KeyError(f"replace of a missing {op['path']}")
                target[last] = op["value"]
        else:
            raise ValueError(f"unsupported patch op {op['op']}")
    return doc


def kserve_errors(data, type_name, path="InferenceService"):
    """Strict check of `data` against a kserve (or kubernetes client) generated model: every key known, every
    value of its declared type."""
    import kserve.models
    import kubernetes.client.models

    # kserve's models write list[X] / dict(K, V); the kubernetes client's, List[X] / Dict[K, V].
    if type_name.startswith("List["):
        type_name = "list[" + type_name[5:]
    if type_name.startswith("Dict["):
        type_name = "dict(" + type_name[5:-1] + ")"
    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(data) for e in kserve_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            return [f"{path}: expected a map"]
        value_type = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in data.items() for e in kserve_errors(v, value_type, f"{path}.{k}")]
    scalar = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "ResourceQuantity": (str, int, float), "datetime": (str, datetime.datetime)}
    if type_name in scalar:
        ok = isinstance(data, scalar[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if cls is None:
        return [f"{path}: no model class {type_name} to check against"]
    if type_name == "IntOrString" or (hasattr(cls, "openapi_types") and not cls.openapi_types):
        return []
    if not isinstance(data, dict):
        return [f"{path}: expected an object ({type_name})"]
    by_json = {v: k for k, v in cls.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        errors += kserve_errors(value, cls.openapi_types[by_json[key]], f"{path}.{key}")
    return errors


def main():
    # Kubernetes resources, strictly.
    kustomization = load(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    for name in listed:
        check((K8S / name).is_file(), f"kustomization resource {name} exists")
    files = sorted(p for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "servicemonitor.yaml"))
    for f in files:
        err = k8s_errors(load(f))
        check(err is None, f"{f.relative_to(ROOT)}: valid {load(f)['kind']} (Kubernetes {VERSION}, strict){'' if err is None else ': ' + err}")
    check(set(listed) <= {f.name for f in files}, "every listed resource was validated")

    # The GPU variant: the base Deployment with the overlay's patches, validated.
    gpu = load(K8S / "gpu/kustomization.yaml")
    check(gpu["resources"] == ["../"], "the GPU overlay builds on deploy/k8s")
    deployment = load(K8S / "deployment.yaml")
    for p in gpu["patches"]:
        check(p["target"]["kind"] == "Deployment" and p["target"]["name"] == deployment["metadata"]["name"], "the GPU patch targets the Deployment")
        deployment = apply_json_patch(deployment, yaml.safe_load(p["patch"]))
    err = k8s_errors(deployment)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    check(err is None and container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["image"] == "camserve:cuda",
          f"deploy/k8s/gpu: the patched Deployment is valid, one GPU, the CUDA image{'' if err is None else ': ' + err}")

    # Negative control: strict validation rejects a misspelt field.
    broken = load(K8S / "deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    err = k8s_errors(broken)
    check(err is not None and "imagePullPolicyy" in err, "a misspelt Deployment field fails strict validation")

    # The Deployment's promises: probes, drain, non-root read-only root, keys from a Secret.
    spec = load(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    config = load(K8S / "configmap.yaml")["data"]["camserve.toml"]
    drain_s = 5 + 1 + 30  # preStop sleep + drain_delay_ms + shutdown_grace_ms, as configured
    check("drain_delay_ms = 1000" in config and "shutdown_grace_ms = 30000" in config and c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
          and spec["terminationGracePeriodSeconds"] > drain_s, f"termination grace {spec['terminationGracePeriodSeconds']} s > preStop + drain + grace ({drain_s} s)")
    check(c["startupProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
          and c["livenessProbe"]["httpGet"]["path"] == "/healthz", "probes on /readyz and /healthz")
    check(spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"], "non-root, read-only root filesystem")
    check(any(v.get("secret", {}).get("secretName") == "camserve-api-keys" for v in spec["volumes"]) and 'api_keys_file = "/etc/camserve/keys/api-keys"' in config,
          "API keys from the Secret, config from the ConfigMap")

    # The ServiceMonitor: no schema on PyPI; its required fields, and that it finds the Service.
    sm = load(K8S / "servicemonitor.yaml")
    svc = load(K8S / "service.yaml")
    check(sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
          and sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
          and sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]],
          "servicemonitor.yaml selects the Service and its port (checked by hand: no schema on PyPI)")

    # KServe: the InferenceService against the kserve package's models, strictly, and a negative control.
    isvc = load(ROOT / "deploy/kserve/inferenceservice.yaml")
    check(isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService", "deploy/kserve: an InferenceService v1beta1")
    errors = kserve_errors(isvc, "V1beta1InferenceService")
    check(not errors, f"deploy/kserve/inferenceservice.yaml matches kserve's V1beta1InferenceService{': ' + '; '.join(errors) if errors else ''}")
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["containers"][0]["readinessProbee"] = {}
    check(any("readinessProbee" in e for e in kserve_errors(bad, "V1beta1InferenceService")), "a misspelt InferenceService field fails")
    # Its container is also a valid Kubernetes container (as a Pod, strictly).
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": isvc["spec"]["predictor"]["containers"]}}
    err = k8s_errors(pod)
    check(err is None, f"the predictor container is a valid Kubernetes container{'' if err is None else ': ' + err}")
    print(f"manifests: {checklist.passed} checks passed")


if __name__ == "__main__":
    main()
