"""Loading and saving models: clear errors for bad files, atomic writes, external data, metadata stamps."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.__about__ import __version__
from onnxopt.errors import InputError
from onnxopt.runtime import PROTOBUF_LIMIT_BYTES, model_size_bytes

logger = logging.getLogger(__name__)


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model through onnx_ir; external weights stay on disk, memory-mapped, until used."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file '{path}' does not exist", fix="check the path")
    if not path.is_file():
        raise InputError(f"'{path}' is not a file", fix="give the path of a .onnx file")
    try:
        model = ir.load(path)
    except (DecodeError, RuntimeError, ValueError, TypeError, OSError) as error:
        raise InputError(
            f"'{path}' is not a readable ONNX model",
            details=[f"{type(error).__name__}: {error}"],
            fix="check that the file is a complete .onnx file (a truncated download or a file of another format?)",
        ) from error
    _check_graph(path, model)
    _check_external_data(path, model)
    return model


def _check_graph(path: Path, model: ir.Model) -> None:
    """A protobuf parse succeeds on many non-ONNX bytes; a graph with no outputs is the tell."""
    if not model.graph.outputs:
        raise InputError(
            f"'{path}' is not an ONNX model: its graph has no outputs",
            fix="check that the file is an ONNX model and not some other protobuf or a truncated file",
        )


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield name, value.const_value


def _check_external_data(path: Path, model: ir.Model) -> None:
    """Refuse external data a model must not or cannot be read from, before any is read:
    a location outside the model's folder (``../../etc/passwd``, or a link pointing out),
    a file that is missing, and a tensor the file is too short to hold (a truncated file,
    or sizes declared to make a reader allocate more than there is)."""
    outside, missing, short = [], set(), []
    sizes: dict[Path, int] = {}
    for name, tensor in _external_tensors(model):
        folder = Path(tensor.base_dir).resolve()
        file = (Path(tensor.base_dir) / tensor.location).resolve()
        if not file.is_relative_to(folder):
            outside.append(f"'{name}' reads '{tensor.location}', which resolves to '{file}'")
            continue
        if not file.is_file():
            missing.add(str(Path(tensor.base_dir) / tensor.location))
            continue
        if file not in sizes:
            sizes[file] = file.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file] or (tensor.length is not None and tensor.length < tensor.nbytes):
            short.append(
                f"'{name}' needs bytes up to {end:,} of '{tensor.location}', which has {sizes[file]:,}"
            )
    if outside:
        raise InputError(
            f"model '{path}' points to external data outside its folder",
            details=outside[:10],
            fix="onnxopt reads external data only from the model's folder and below; move the "
            "data files there (and do not load models from untrusted sources)",
        )
    if missing:
        raise InputError(
            f"model '{path}' stores weights in external data files that do not exist",
            details=[f"missing: {file}" for file in sorted(missing)],
            fix="keep the external data files next to the .onnx file, as they were exported",
        )
    if short:
        raise InputError(
            f"model '{path}' declares weights its external data files do not hold",
            details=short[:10],
            fix="the data file is truncated or does not belong to this model: copy it again "
            "from where the model was exported",
        )


def external_data_files(model: ir.Model) -> set[Path]:
    """The files that hold the model's external initializers."""
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.base_dir) / tensor.location)
    return files


def stamp_metadata(model: ir.Model, recipe: str, passes: Sequence[str]) -> None:
    """Record what produced the model, so a deployed file says how it was made."""
    model.metadata_props["onnxopt.version"] = __version__
    model.metadata_props["onnxopt.recipe"] = recipe
    model.metadata_props["onnxopt.passes"] = ",".join(passes)


def check_output_path(
    output: str | os.PathLike, protected: Sequence[str | os.PathLike] = ()
) -> Path:
    """Refuse an output that would overwrite an input, or a folder we cannot write to, before any work."""
    output = Path(output)
    if output.exists() and output.is_dir():
        raise InputError(
            f"output '{output}' is a folder", fix="give a file name, e.g. model.opt.onnx"
        )
    for path in protected:
        path = Path(path)
        if path.exists() and output.exists() and os.path.samefile(path, output):
            raise InputError(
                f"output '{output}' is the input model '{path}'; onnxopt never overwrites its input",
                fix="choose another output path, e.g. model.opt.onnx",
            )
        if Path(f"{output}.data").resolve() == path.resolve():
            raise InputError(
                f"output '{output}' would write its external data over '{path}', which the input uses",
                fix="choose another output name",
            )
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(
            f"output folder '{folder}' does not exist", fix=f"create it first: mkdir -p {folder}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            f"output folder '{folder}' is not writable", fix="choose a folder you can write to"
        )
    return output


def save(
    model: ir.Model,
    output: str | os.PathLike,
    *,
    protected: Sequence[str | os.PathLike] = (),
    external_data: bool | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT_BYTES,
) -> list[Path]:
    """Write the model atomically: into a temporary folder beside the target, then rename.

    Args:
        model: the model to write.
        output: the target .onnx path.
        protected: paths that must not be overwritten (the input model and its data).
        external_data: True to write weights to ``<output>.data``; None to do so only when the
            weights exceed ``external_data_threshold`` (protobuf cannot hold more than 2 GB).
        external_data_threshold: weight bytes above which external data is used when not forced.

    Returns:
        The files written, the model last.
    """
    output = check_output_path(output, protected)
    if external_data is None:
        external_data = model_size_bytes(model) > external_data_threshold
    data_name = f"{output.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=output.parent))
    try:
        staged_model = staging / output.name
        try:
            with _initializer_types_left_to_tensors(model):
                if external_data:
                    ir.save(model, staged_model, external_data=data_name)
                else:
                    ir.save(_with_inline_weights(model), staged_model)
        except OSError as error:
            raise InputError(
                f"cannot write '{output}': {error.strerror or error}",
                details=[f"{type(error).__name__}: {error}"],
                fix="free space on its disk or choose another folder; nothing was written, "
                "and a file already at that path is unchanged",
            ) from error
        written = []
        if external_data:
            os.replace(staging / data_name, output.parent / data_name)
            written.append(output.parent / data_name)
        os.replace(staged_model, output)
        written.append(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", ", ".join(str(path) for path in written))
    return written


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically: a new temporary file in the same folder, renamed into place.

    A failure leaves neither a partial file nor the temporary one behind.

    Raises:
        InputError: the file cannot be written there.
    """
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else "."
        )
    except OSError as error:
        raise InputError(
            f"cannot write '{path}'",
            details=[f"{type(error).__name__}: {error}"],
            fix="give a path in an existing folder you can write to",
        ) from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise InputError(
                f"cannot write '{path}'",
                details=[f"{type(error).__name__}: {error}"],
                fix="give a path in an existing folder you can write to",
            ) from error
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _initializer_types_left_to_tensors(model: ir.Model) -> Iterator[None]:
    """While saving, initializers that are not graph inputs have no type or shape of their own.

    onnx_ir writes a value_info entry for every typed initializer, although the tensor states
    its type and shape: on a quantized transformer, 10 KB of the file say nothing new.
    """
    inputs = set(model.graph.inputs)
    cleared = [
        (value, value.type, value.shape)
        for value in model.graph.initializers.values()
        if value not in inputs and value.const_value is not None
    ]
    for value, _, _ in cleared:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, value_type, shape in cleared:
            value.type, value.shape = value_type, shape


def _with_inline_weights(model: ir.Model) -> ir.Model:
    """Make external tensors inline so the written file stands alone, not pointing at the input's data."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    return model
