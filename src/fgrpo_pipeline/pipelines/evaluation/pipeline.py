from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_base_and_trained, plot_training_curves


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_base_and_trained,
                inputs=["base_policy", "trained_policy", "prompts", "params:evaluation"],
                outputs=["evaluation_report", "evaluation_samples"],
                name="evaluate_base_and_trained_node",
            ),
            Node(
                plot_training_curves,
                inputs="training_metrics",
                outputs="training_curves",
                name="plot_training_curves_node",
            ),
        ]
    )
