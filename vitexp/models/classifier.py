"""What every classifier shares around its backbone: images at the model's size, the head."""

from keras import layers

from vitexp.models.regularization import Dropout


def at_size(x, input_shape, image_size: int):
    """`x` resized to `image_size` x `image_size` where the stored images have another size."""
    if tuple(input_shape[:2]) == (image_size, image_size):
        return x
    return layers.Resizing(image_size, image_size, name="resize")(x)


def classification_head(features, head_units, head_dropout: float, num_classes: int):
    """Dropout, then per entry of `head_units` a GELU layer and dropout, then float32 logits."""
    x = Dropout(head_dropout, name="head_dropout")(features)
    for i, units in enumerate(head_units):
        x = layers.Dense(units, activation="gelu", name=f"head_{i}")(x)
        x = Dropout(head_dropout, name=f"head_dropout_{i}")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)
