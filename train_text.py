"""Train top-k SAEs on the layers of a text encoder and record its features (docs/design.md#the-sae, #runs-on-disk).

    uv run train_text.py --model Bert --bert_model_name all-MiniLM-L6-v2 --layers 0 1 2 --runname NAME
"""
from errors import cli
from saeshare.training.train import main_for


@cli
def main(argv=None):
    main_for("text", argv)


if __name__ == "__main__":
    main()
