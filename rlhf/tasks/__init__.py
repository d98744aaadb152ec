"""Built-in tasks with a known gold reward, so the whole pipeline runs offline (see ``sentiment``)."""
