from kedro.pipeline import Node, Pipeline

from .nodes import build_safety_base_policy


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_safety_base_policy,
                inputs=["safety_records", "params:safety_base_policy"],
                outputs=["safety_base_policy", "safety_warmup_metrics"],
                name="build_safety_base_policy_node",
            )
        ]
    )
