"""eqtrace: online learning of recurrent and spiking networks with eligibility traces."""

from importlib.metadata import version as _version

from . import nn as nn, plot as plot, tasks as tasks
from ._algorithm import AbstractAlgorithm as AbstractAlgorithm
from ._algorithms._drtrl import DRTRL as DRTRL, DRTRLTrace as DRTRLTrace
from ._algorithms._eprop import EProp as EProp, EPropTrace as EPropTrace
from ._algorithms._filtered import Filtered as Filtered
from ._algorithms._lowrank import LowRankRTRL as LowRankRTRL, LowRankRTRLTrace as LowRankRTRLTrace
from ._algorithms._otpe import (
    OTPE as OTPE,
    OTPEInputTraces as OTPEInputTraces,
    OTPETrace as OTPETrace,
)
from ._algorithms._ottt import OTTT as OTTT, OTTTTrace as OTTTTrace
from ._algorithms._ppprop import PPProp as PPProp, PPPropTrace as PPPropTrace
from ._algorithms._rtrl import RTRL as RTRL, RTRLTrace as RTRLTrace
from ._algorithms._snap import SnAp1 as SnAp1, SnAp1Trace as SnAp1Trace
from ._algorithms._snapn import SnAp as SnAp, SnApTrace as SnApTrace
from ._algorithms._uoro import UORO as UORO, UOROTrace as UOROTrace
from ._algorithms._windows import ExactWindows as ExactWindows
from ._cell import AbstractCell as AbstractCell
from ._check import (
    StructureReport as StructureReport,
    TraceSize as TraceSize,
    check as check,
    trace_size as trace_size,
)
from ._checkpoint import (
    latest_checkpoint as latest_checkpoint,
    restore_checkpoint as restore_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._checkpoint_lock import CheckpointLockedError as CheckpointLockedError
from ._checkpoint_steps import CheckpointDamagedError as CheckpointDamagedError
from ._diagnostics import (
    GradientComparison as GradientComparison,
    compare_gradients as compare_gradients,
)
from ._drivers import (
    bptt_gradient as bptt_gradient,
    init_state_and_trace as init_state_and_trace,
    make_forward_step as make_forward_step,
    make_online_block as make_online_block,
    make_online_step as make_online_step,
    online_gradient as online_gradient,
    run_online as run_online,
    train_online as train_online,
    truncated_bptt_gradient as truncated_bptt_gradient,
)
from ._fidelity import Fidelity as Fidelity, FidelityMonitor as FidelityMonitor
from ._modulated import modulated_loss as modulated_loss
from ._nir import from_nir as from_nir, to_nir as to_nir
from ._ops import OpAlgebra as OpAlgebra, register_op as register_op
from ._plan import LayerPlan as LayerPlan, Plan as Plan, prepare as prepare
from ._sharding import (
    Shardings as Shardings,
    init_sharded as init_sharded,
    make_shardings as make_shardings,
)
from ._structure import (
    ParamKind as ParamKind,
    StructureError as StructureError,
    Violation as Violation,
    ViolationKind as ViolationKind,
)
from ._synthetic import (
    SyntheticGradient as SyntheticGradient,
    synthetic_gradient as synthetic_gradient,
    train_synthetic as train_synthetic,
)


__version__ = _version("eqtrace")
