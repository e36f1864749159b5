"""Serving: an async front over one engine thread, with thin REST (OpenAI-compatible) and gRPC adapters.

    openai_api.py (FastAPI)    grpc_server.py (grpc.aio)
                  \\              /
               requests.py: request fields -> prompt ids, SamplingParams, routing spec
                        |
               async_engine.py: AsyncEngine -- commands --> engine thread: Engine.add_request / abort / step
                                RequestStream <-- Delta per step (loop.call_soon_threadsafe)
                        |        (`serve`: the engine thread drives the engine in a process of its own,
                        |         engine_core.py: EngineCoreClient <-- pipe --> the engine process)
               metrics.py (Prometheus, own registry)     server.py: both servers, one process    cli.py: `serve`
"""
