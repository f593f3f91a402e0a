"""Train top-k SAEs on the layers of a image encoder and record its features (docs/design.md#the-sae, #runs-on-disk).

    uv run train_image.py --model ClipVision --clip_model_name ViT-B/32-quickgelu --layers 0 1 2 --runname NAME
"""
from errors import cli
from saeshare.training.train import main_for


@cli
def main(argv=None):
    main_for("image", argv)


if __name__ == "__main__":
    main()
