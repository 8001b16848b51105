from kedro.pipeline import Node, Pipeline

from .nodes import build_safety_tables, load_safety_records


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                load_safety_records,
                inputs="params:safety_data",
                outputs="safety_records",
                name="load_safety_records_node",
            ),
            Node(
                build_safety_tables,
                inputs=["safety_records", "params:safety_data"],
                outputs=[
                    "safety_prompts",
                    "safety_aligned",
                    "safety_unaligned",
                    "reward_pairs_train",
                    "reward_pairs_test",
                ],
                name="build_safety_tables_node",
            ),
        ]
    )
