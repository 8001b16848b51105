from kedro.pipeline import Node, Pipeline

from .nodes import label_rollouts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                label_rollouts,
                inputs=["rollouts", "params:reward_labeling"],
                outputs=["labeled_rollouts", "aligned", "unaligned", "reward_groups"],
                name="label_rollouts_node",
            )
        ]
    )
