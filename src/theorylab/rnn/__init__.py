"""The RNN unit of Q1 (h-form and g-form) and exact diagnostics of its gradients.

```python
from theorylab.rnn import RNN, log_jacobian_norms, lyapunov_spectrum, derivative_bound
rnn = RNN(input_size, hidden_size, activation="tanh", form="h")
states, last = rnn(x, h0)                  # x (B, T, I), h0 (B, H) | None
log_jacobian_norms(rnn, x, h0)             # (B, T): log ||ds_t/ds_0||_2, exact, overflow-free
log_jacobian_profile(rnn, x, h0)           # (B, T): log ||ds_T/ds_t||_2 for t = 0..T-1 (one backward sweep)
lyapunov_spectrum(rnn, x, h0, k)           # (B, k): top-k Lyapunov exponents, nats per step
certificate(rnn)                           # sigma_max(W) * gamma, the bound delta^T, vanishing guaranteed?
derivative_bound("gelu")                   # sup |sigma'| = Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.1289...
```

The diagnostics take the module or ``torch.compile(rnn)``, and leave it as it was: a parametrized W
(``torch.nn.utils.parametrizations.spectral_norm``, ``orthogonal``) is computed once per call, in eval mode, so
spectral_norm's power iteration does not advance. Inside ``torch.autocast`` the module runs in autocast's dtype,
as ``torch.nn.RNN`` does.
"""

from .activations import ACTIVATIONS, Activation, derivative_bound, get_activation, register_activation
from .jacobian import (
    JacobianFactors,
    jacobian_factors,
    log_jacobian_norms,
    log_jacobian_profile,
    log_norms_of_products,
    log_norms_of_products_reference,
    stack_factors,
    trajectory_derivatives,
)
from .lyapunov import Certificate, certificate, lyapunov_from_factors, lyapunov_spectrum
from .model import FORMS, RNN

__all__ = [
    "ACTIVATIONS",
    "FORMS",
    "RNN",
    "Activation",
    "Certificate",
    "JacobianFactors",
    "certificate",
    "derivative_bound",
    "get_activation",
    "jacobian_factors",
    "log_jacobian_norms",
    "log_jacobian_profile",
    "log_norms_of_products",
    "log_norms_of_products_reference",
    "lyapunov_from_factors",
    "lyapunov_spectrum",
    "register_activation",
    "stack_factors",
    "trajectory_derivatives",
]
