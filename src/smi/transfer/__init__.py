"""Data-free knowledge transfer (`smi.distill`): teach a student the teacher's outputs on synthetic images."""

from smi.transfer.config import DistillConfig
from smi.transfer.loop import DistillResult, distill, kd_loss
from smi.transfer.student import Student, build_student

__all__ = ["DistillConfig", "DistillResult", "Student", "build_student", "distill", "kd_loss"]
