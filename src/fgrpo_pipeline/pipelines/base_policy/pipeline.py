from kedro.pipeline import Node, Pipeline

from .nodes import build_base_policy


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_base_policy,
                inputs=["prompts", "params:base_policy"],
                outputs=["base_policy", "warmup_metrics"],
                name="build_base_policy_node",
            )
        ]
    )
