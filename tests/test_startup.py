"""A vitexp command imports Keras without scikit-learn; everyone else gets it as usual."""

import json
import subprocess
import sys

COMMAND = """
import json, sys
import vitexp.cli
sys.argv = ["vitexp", "--help"]
try:
    vitexp.cli.main()
except SystemExit:
    pass
def finders():
    return sum(type(f).__name__ == "_NotForKerasWrappers" for f in sys.meta_path)
seen = {"by_main": finders()}
vitexp.cli.leave_sklearn_out_of_keras()  # a second call adds nothing
import keras
from keras.src.wrappers import fixes
seen |= {"after_keras": "sklearn" in sys.modules, "wrappers_have_it": fixes.sklearn is not None}
import sklearn.ensemble  # Optuna's importances fit one
forest = sklearn.ensemble.RandomForestRegressor(n_estimators=2, random_state=0).fit([[0], [1]], [0, 1])
seen["forest"] = float(forest.predict([[1]])[0])
seen["finders"] = finders()
print(json.dumps(seen))
"""

LIBRARY = """
import json, sys
import vitexp.train.run  # a user's own script or notebook: Keras comes with vitexp's training
print(json.dumps({"after_keras": "sklearn" in sys.modules}))
"""


def imports_of(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_command_imports_keras_without_sklearn_and_sklearn_still_works():
    seen = imports_of(COMMAND)
    expected = {"by_main": 1, "after_keras": False, "wrappers_have_it": False, "finders": 1}
    assert seen == {**expected, "forest": seen["forest"]}
    assert 0.0 <= seen["forest"] <= 1.0


def test_a_library_user_keeps_keras_whole():
    # also the premise: left alone, Keras imports scikit-learn (else the command saves nothing)
    assert imports_of(LIBRARY) == {"after_keras": True}
