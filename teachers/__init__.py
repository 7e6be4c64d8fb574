"""Teacher specs turned into loaded models with their preprocessing, fingerprint and outputs."""
from .model import Preprocessing, Teacher, check_teacher_spec, load_teacher
from .spec import TeacherSpec, TeacherSpecError, load_teachers_file, parse_teacher_spec

__all__ = [
    "Preprocessing",
    "Teacher",
    "TeacherSpec",
    "TeacherSpecError",
    "check_teacher_spec",
    "load_teacher",
    "load_teachers_file",
    "parse_teacher_spec",
]
