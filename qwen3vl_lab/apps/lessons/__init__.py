"""Exercises for the teaching notebooks: one module per lesson, each with reference solutions and
`check_...(student_fn)` functions that say where a student's answer differs from the reference, with a hint."""
