"""Checks the enum values of rendered Kubernetes manifests that the JSON
schemas (kubernetes-validate --strict) leave as plain strings, plus the
invariants of convflow's sharded run. Reads the multi-document YAML of
`kubectl kustomize deploy/k8s` on stdin; prints every problem; exit 1 if any.
"""
import sys

import yaml

ENUMS = {
    # path inside a Job (tuple of keys; "*" = every list item) -> allowed values
    ("spec", "completionMode"): {"NonIndexed", "Indexed"},
    ("spec", "podReplacementPolicy"): {"TerminatingOrFailed", "Failed"},
    ("spec", "template", "spec", "restartPolicy"): {"Never", "OnFailure"},
    ("spec", "podFailurePolicy", "rules", "*", "action"): {"FailJob", "FailIndex", "Ignore", "Count"},
    ("spec", "podFailurePolicy", "rules", "*", "onExitCodes", "operator"): {"In", "NotIn"},
    ("spec", "podFailurePolicy", "rules", "*", "onPodConditions", "*", "status"): {"True", "False", "Unknown"},
    ("spec", "template", "spec", "containers", "*", "imagePullPolicy"): {"Always", "IfNotPresent", "Never"},
}
PVC_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}


def values(node, path):
    if not path:
        yield node
        return
    key, rest = path[0], path[1:]
    if key == "*":
        for item in node if isinstance(node, list) else []:
            yield from values(item, rest)
    elif isinstance(node, dict) and key in node:
        yield from values(node[key], rest)


def main():
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    problems = []
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for d in docs:
        name = f'{d["kind"]}/{d["metadata"]["name"]}'
        if d["kind"] == "Job":
            for path, allowed in ENUMS.items():
                for v in values(d, path):
                    if v not in allowed:
                        problems.append(f"{name}: {'.'.join(path)} = {v!r}, expected one of {sorted(allowed)}")
        if d["kind"] == "PersistentVolumeClaim":
            for m in d["spec"].get("accessModes", []):
                if m not in PVC_MODES:
                    problems.append(f"{name}: accessModes has {m!r}, expected one of {sorted(PVC_MODES)}")
    extract = by_name.get(("Job", "convflow-extract"))
    if extract is None:
        problems.append("no Job convflow-extract")
    else:
        spec = extract["spec"]
        if spec.get("completionMode") != "Indexed":
            problems.append("Job/convflow-extract: completionMode must be Indexed (JOB_COMPLETION_INDEX is the shard)")
        if "backoffLimitPerIndex" not in spec:
            problems.append("Job/convflow-extract: backoffLimitPerIndex missing (each shard retries on its own)")
        run = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("convflow-run")]
        shards = int(run[0]["data"]["SHARDS"]) if run else None
        if shards != spec.get("completions"):
            problems.append(f"Job/convflow-extract: completions {spec.get('completions')} != SHARDS {shards}")
        if spec.get("parallelism", 1) > spec.get("completions", 1):
            problems.append("Job/convflow-extract: parallelism above completions")
        for c in spec["template"]["spec"]["containers"]:
            if "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
                problems.append(f"Job/convflow-extract: container {c['name']} asks for no GPU")
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
