from kedro.pipeline import Node, Pipeline

from .nodes import generate_rollouts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                generate_rollouts,
                inputs=["base_policy", "prompts", "params:rollout_generation"],
                outputs="rollouts",
                name="generate_rollouts_node",
            )
        ]
    )
