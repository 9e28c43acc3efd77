PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,torch,ray,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/onnxopt inspect models/mnist_cnn.onnx
	$(BIN)/onnxopt optimize models/mnist_cnn.onnx -o out/mnist_cnn.cleanup.onnx --recipe cleanup \
		--calib models/mnist_calibration.npz --report out/mnist_cnn.cleanup.json
	$(BIN)/onnxopt optimize models/mnist_cnn.onnx -o out/mnist_cnn.int8.onnx --recipe int8 \
		--calib models/mnist_calibration.npz --report out/mnist_cnn.int8.json
	$(BIN)/onnxopt compare models/mnist_cnn.onnx out/mnist_cnn.int8.onnx --data models/mnist_calibration.npz --runs 100

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Many more random graphs through every preset than the suite's fixed few (tests/test_fuzz.py).
fuzz: $(STAMP)
	ONNXOPT_FUZZ_EXAMPLES=$${ONNXOPT_FUZZ_EXAMPLES:-300} $(BIN)/python -m pytest -q tests/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/quantization.py

clean:
	rm -rf $(VENV) out
