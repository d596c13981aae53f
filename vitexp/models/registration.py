"""One decorator registers every vitexp layer, so a `.keras` checkpoint reloads in safe mode.

A layer is saved as `vitexp>ClassName` whatever module defines it: moving a class between
modules keeps old checkpoints loadable, renaming it does not.
"""

import keras

PACKAGE = "vitexp"

register = keras.saving.register_keras_serializable(package=PACKAGE)
