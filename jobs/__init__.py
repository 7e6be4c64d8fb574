"""Ray entry points for the teacher-cache and student-training jobs."""
