"""CKKS encrypted inference: the Approx-CNN compiled to an HE-CNN, run on SEAL ciphertexts.

A hospital keeps the secret key, encrypts a preprocessed scan and decrypts the logits; the
server holds only the compiled model and the public evaluation keys. Modules, from the
compiler up to the runtime and the stage entry points (each layer imports only those
before it):

Compiler (pure; :mod:`he_inference.passes`, run in this order by :mod:`~he_inference.compiler`)
    ``passes.ir`` value types · ``passes.trace`` PyTorch → network · ``passes.fold``
    BatchNorm, patchify stem, pools into the classifier · ``passes.layout`` slot packing ·
    ``passes.program`` instruction set and the frozen plan · ``passes.lower`` network →
    plan · ``passes.levels`` the one level and scale assignment · ``passes.cost`` counts and
    the cost model · ``passes.interpret`` plaintext references · ``ckks`` ring parameters ·
    ``images`` images read as in training.
Artifact and runtime
    ``artifact`` the compiled model and its ``.he`` file · ``compiler`` the pipeline
    (``compile_model``, ``compile_checkpoint``) · ``serial`` the wire format · ``keys``
    secret and public key material · ``engine`` one-process encrypted forward pass ·
    ``parallel`` the worker pool · ``tokens`` the service's bearer tokens (hashes only).
Both ends
    ``server`` :class:`InferenceServer` (public keys only) · ``client`` encrypt, decrypt,
    the service client · ``service`` the web service.
Stages
    ``roundtrip`` in-process round trips · ``check`` ``privrad he check`` · ``bench``
    ``privrad he bench``. The ``privrad he`` commands (:mod:`simulations.cli.he`) and the end
    of ``make demo`` (:mod:`simulations.he_demo`) sit in the top layer.
"""

from he_inference.artifact import ClientModel, CompiledModel
from he_inference.client import ServiceClient, decrypt_logits, encrypt_image
from he_inference.compiler import CompileOptions, compile_checkpoint, compile_model
from he_inference.keys import PublicKeys, SecretKeys
from he_inference.server import InferenceServer

__all__ = [
    "ClientModel",
    "CompileOptions",
    "CompiledModel",
    "InferenceServer",
    "PublicKeys",
    "SecretKeys",
    "ServiceClient",
    "compile_checkpoint",
    "compile_model",
    "decrypt_logits",
    "encrypt_image",
]
