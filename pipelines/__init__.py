"""diffusers pipelines of diffmem, importable as ``diffmem.pipelines``.

Each file here is also loadable on its own with diffusers' ``custom_pipeline=`` mechanism.
"""
