#!/usr/bin/env node
/*
 * cnapi_flow.js: the CNAPI client flow (../shared/design/API.md, "The
 * client's own test flow") driven by the real sdc-clients CNAPI client
 * against several cnapid instances, every step on another instance than the
 * one before (round-robin over the URLs given).
 *
 *   node cnapi_flow.js [--server UUID] [--no-tasks] [--wait-timeout S]
 *                      URL [URL...]
 *
 * --server     the server to use (must be listed and running); default: the
 *              first running server listServers returns
 * --no-tasks   only the steps that do not make tasks (list, get, update,
 *              boot parameters, platforms, tickets, execute, capacity)
 * --wait-timeout  the timeout waitTask sends (seconds, default 60)
 *
 * Prints one JSON line per step on stdout:
 *   {"step", "instance" (the URL), "server_name" (the answer's
 *    x-server-name), "ok", "ms", "detail"}
 * and, when every step passed, a last line {"step": "done", "ok": true}.
 * On the first failure the step's line has ok=false and detail.error
 * {message, name, statusCode, restCode, body}; the exit status is 1. Usage
 * errors exit 2.
 *
 * Installed by test/node_deps (npm ci in this directory); run by
 * test/integration/test_sdc_clients.py.
 */

'use strict';

var crypto = require('crypto');
var sdc = require('sdc-clients');

// ------------------------------------------------------------------ args

function usage(msg) {
    if (msg) {
        process.stderr.write('cnapi_flow: ' + msg + '\n');
    }
    process.stderr.write('usage: node cnapi_flow.js [--server UUID] ' +
        '[--no-tasks] [--wait-timeout S] URL [URL...]\n');
    process.exit(2);
}

var urls = [];
var wantServer = null;
var withTasks = true;
var waitTimeout = 60;
var argv = process.argv.slice(2);
for (var ai = 0; ai < argv.length; ai++) {
    var a = argv[ai];
    if (a === '--server') {
        wantServer = argv[++ai];
        if (!wantServer) {
            usage('--server needs a UUID');
        }
        wantServer = wantServer.toLowerCase();
    } else if (a === '--no-tasks') {
        withTasks = false;
    } else if (a === '--wait-timeout') {
        waitTimeout = Number(argv[++ai]);
        if (!(waitTimeout >= 1 && waitTimeout <= 3600)) {
            usage('--wait-timeout: 1..3600 seconds');
        }
    } else if (a === '-h' || a === '--help') {
        usage();
    } else if (/^https?:\/\//.test(a)) {
        urls.push(a.replace(/\/+$/, ''));
    } else {
        usage('unknown argument ' + a);
    }
}
if (urls.length === 0) {
    usage('no instance URL');
}

// One client per instance. No retries: a failure must show, not be hidden
// by a second try on the same instance.
var clients = urls.map(function (url) {
    return new sdc.CNAPI({
        url: url,
        retry: false,
        connectTimeout: 5000,
        agent: false
    });
});

// ------------------------------------------------------------------ steps

var turn = 0;
var results = [];

function emit(o) {
    process.stdout.write(JSON.stringify(o) + '\n');
}

function errInfo(err) {
    return {
        message: err.message,
        name: err.name,
        statusCode: err.statusCode,
        restCode: err.restCode,
        body: err.body
    };
}

function closeAll() {
    clients.forEach(function (c) {
        try {
            c.close();
        } catch (e) {
            // nothing to do
        }
    });
}

function fail(step, url, serverName, ms, err, detail) {
    var d = detail || {};
    d.error = (err instanceof Error) ? errInfo(err) : { message: String(err) };
    emit({ step: step, instance: url, server_name: serverName, ok: false,
        ms: ms, detail: d });
    closeAll();
    process.exit(1);
}

function check(cond, msg) {
    if (!cond) {
        throw new Error('check failed: ' + msg);
    }
}

/*
 * step(name, call, verify): call(client) starts one client call whose
 * callback is (err, obj, req, res); verify(obj, res) returns the detail to
 * print (and throws on a wrong answer); a verify that wants the error
 * (expectError) gets (err, res). Runs on the next instance. Resolves with
 * verify's return value.
 */
function step(name, call, verify, opts) {
    opts = opts || {};
    var idx = turn++ % clients.length;
    var client = clients[idx];
    var url = urls[idx];
    var t0 = process.hrtime.bigint();
    var tries = 0;
    return new Promise(function (resolve) {
        var done = false;
        function cb(err, obj, req, res) {
            if (done) {
                return;
            }
            tries++;
            /*
             * opts.poll: a read that may briefly see another instance's
             * near cache before a change notice arrives (docs/api.md,
             * "Consistency and caching"): try again on the same instance,
             * a bounded number of times, 20 ms apart.
             */
            if (opts.poll && tries < opts.poll && !err) {
                try {
                    verify(obj, res);
                } catch (e) {
                    setTimeout(function () { call(client, cb); }, 20);
                    return;
                }
            }
            done = true;
            var ms = Number(process.hrtime.bigint() - t0) / 1e6;
            ms = Math.round(ms * 10) / 10;
            var serverName = (res && res.headers) ?
                res.headers['x-server-name'] : undefined;
            var detail;
            try {
                if (opts.expectError) {
                    check(err, name + ' should have failed, got ' +
                        JSON.stringify(obj));
                    detail = verify(err, res);
                } else {
                    if (err) {
                        throw err;
                    }
                    detail = verify(obj, res);
                }
            } catch (e) {
                fail(name, url, serverName, ms, e,
                    { status: res ? res.statusCode : null });
                return;
            }
            var line = { step: name, instance: url, server_name: serverName,
                ok: true, ms: ms, detail: detail };
            if (tries > 1) {
                line.tries = tries;
            }
            results.push(line);
            emit(line);
            resolve(detail);
        }
        try {
            call(client, cb);
        } catch (e) {
            fail(name, url, undefined, 0, e);
        }
    });
}

function isUuid(s) {
    return typeof (s) === 'string' &&
        /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(s);
}

// ------------------------------------------------------------------ flow

var server;         // the chosen server's uuid
var vmUuid = crypto.randomUUID();
var taskIds = {};   // step name -> task id

function checkTask(task, id, want, name) {
    check(task && task.id === id, name + ': task id ' + JSON.stringify(task));
    check(task.server_uuid === server, name + ': server_uuid ' + task.server_uuid);
    if (want) {
        check(task.task === want, name + ': task ' + task.task + ' want ' + want);
    }
    check(Array.isArray(task.history), name + ': history');
}

/* A VM task: start it on one instance, wait on the next, load on the next. */
function vmTask(name, start, taskName, wantState) {
    var id;
    return step(name, start, function (obj, res) {
        check(res.statusCode === 200, name + ': status ' + res.statusCode);
        check(isUuid(obj.id), name + ': no task id in ' + JSON.stringify(obj));
        id = obj.id;
        taskIds[name] = id;
        return { task_id: id };
    }).then(function () {
        return step('waitTask(' + name + ')', function (c, cb) {
            c.waitTask(id, { timeout: waitTimeout }, cb);
        }, function (task) {
            checkTask(task, id, taskName, name);
            check(task.status === 'complete', name + ': task ended ' +
                task.status + ' ' + JSON.stringify(task.error || null));
            return { task_id: id, status: task.status,
                history: task.history.map(function (h) { return h.name; }) };
        });
    }).then(function () {
        if (!wantState) {
            return null;
        }
        return step('getVm(' + name + ')', function (c, cb) {
            c.getVm(server, vmUuid, cb);
        }, function (vm) {
            check(vm.uuid === vmUuid, 'getVm: uuid ' + vm.uuid);
            check(vm.state === wantState, 'getVm after ' + name + ': state ' +
                vm.state + ', want ' + wantState);
            return { vm_uuid: vm.uuid, state: vm.state };
        });
    });
}

function main() {
    return step('ping', function (c, cb) {
        c.ping(cb);
    }, function (obj) {
        check(obj && typeof (obj.ready) === 'boolean', 'ping: ' +
            JSON.stringify(obj));
        return obj;
    }).then(function () {
        // the client pages itself (limit=1000&offset=N until a short page)
        return step('listServers', function (c, cb) {
            c.listServers(cb);
        }, function (servers) {
            check(Array.isArray(servers), 'listServers: not an array');
            var uuids = servers.map(function (s) { return s.uuid; });
            var sorted = uuids.slice().sort();
            check(JSON.stringify(uuids) === JSON.stringify(sorted),
                'listServers: not sorted by uuid');
            var running = servers.filter(function (s) {
                return s.status === 'running';
            });
            var pick = wantServer ? servers.filter(function (s) {
                return s.uuid === wantServer;
            })[0] : running[0];
            check(pick, 'no server ' + (wantServer || 'running') + ' in ' +
                JSON.stringify(uuids));
            check(pick.status === 'running', 'server ' + pick.uuid +
                ' is ' + pick.status);
            check(pick.sysinfo === undefined, 'listServers: sysinfo without extras');
            server = pick.uuid;
            return { count: servers.length, running: running.length,
                server: server, uuids: uuids };
        });
    }).then(function (all) {
        // paging by hand, as a caller passing limit/offset does: one server
        // a page, on a different instance each page
        var got = [];
        function page(offset) {
            return step('listServers(limit=1,offset=' + offset + ')',
                function (c, cb) {
                    c.listServers({ limit: 1, offset: offset }, cb);
                }, function (servers) {
                    check(Array.isArray(servers) && servers.length <= 1,
                        'a page of at most 1: ' + JSON.stringify(servers));
                    return servers.map(function (s) { return s.uuid; });
                }).then(function (uuids) {
                    got = got.concat(uuids);
                    if (uuids.length === 0) {
                        check(JSON.stringify(got) === JSON.stringify(all.uuids),
                            'paged list ' + JSON.stringify(got) + ' != ' +
                            JSON.stringify(all.uuids));
                        return null;
                    }
                    check(offset < all.uuids.length + 1, 'paging does not end');
                    return page(offset + 1);
                });
        }
        return page(0);
    }).then(function () {
        return step('getServer', function (c, cb) {
            c.getServer(server, cb);
        }, function (s) {
            check(s.uuid === server, 'getServer: uuid ' + s.uuid);
            check(s.status === 'running', 'getServer: status ' + s.status);
            check(s.sysinfo && s.sysinfo.UUID === server, 'getServer: sysinfo');
            check(typeof (s.vms) === 'object', 'getServer: vms');
            return { uuid: s.uuid, hostname: s.hostname, status: s.status,
                ram: s.ram, admin_ip: s.admin_ip, agent_port: s.agent_port };
        });
    }).then(function () {
        var comment = 'cnapi_flow ' + vmUuid;
        return step('updateServer', function (c, cb) {
            c.updateServer(server, { comments: comment }, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'updateServer: status ' + res.statusCode);
            return { status: res.statusCode };
        }).then(function () {
            return step('getServer(after update)', function (c, cb) {
                c.getServer(server, cb);
            }, function (s) {
                check(s.comments === comment, 'comments ' +
                    JSON.stringify(s.comments));
                return { comments: s.comments };
            }, { poll: 50 });
        });
    }).then(function () {
        return step('listPlatforms', function (c, cb) {
            c.listPlatforms(cb);
        }, function (p) {
            check(p && typeof (p) === 'object' && !Array.isArray(p),
                'listPlatforms: ' + JSON.stringify(p));
            return p;
        });
    }).then(function () {
        return step('getBootParams', function (c, cb) {
            c.getBootParams(server, cb);
        }, function (b) {
            check(b && typeof (b.kernel_args) === 'object',
                'getBootParams: ' + JSON.stringify(b));
            check(typeof (b.platform) === 'string', 'getBootParams: platform');
            return { platform: b.platform, kernel_args: b.kernel_args };
        });
    }).then(function () {
        return step('setBootParams', function (c, cb) {
            c.setBootParams(server, { kernel_args: { cnapi_flow: 'yes' } }, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'setBootParams: status ' +
                res.statusCode);
            return { status: res.statusCode };
        });
    }).then(function () {
        return step('getBootParams(after set)', function (c, cb) {
            c.getBootParams(server, cb);
        }, function (b) {
            check(b.kernel_args.cnapi_flow === 'yes', 'kernel_args ' +
                JSON.stringify(b.kernel_args));
            return { kernel_args: b.kernel_args };
        }, { poll: 50 });
    }).then(function () {
        // a null deletes the key again (POST merges)
        return step('setBootParams(unset)', function (c, cb) {
            c.setBootParams(server, { kernel_args: { cnapi_flow: null } }, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'setBootParams: ' + res.statusCode);
            return { status: res.statusCode };
        });
    }).then(function () {
        return ticketSteps();
    }).then(function () {
        if (!withTasks) {
            return null;
        }
        return taskSteps();
    }).then(function () {
        return step('commandExecute', function (c, cb) {
            c.commandExecute(server, 'echo "hello $1 $CNAPI_FLOW"; echo warn >&2',
                { args: ['world'], env: { CNAPI_FLOW: 'flow' }, json: true }, cb);
        }, function (r) {
            check(r.exitCode === 0, 'commandExecute: exitCode ' + r.exitCode);
            check(r.stdout === 'hello world flow\n', 'commandExecute: stdout ' +
                JSON.stringify(r.stdout));
            check(r.stderr === 'warn\n', 'commandExecute: stderr ' +
                JSON.stringify(r.stderr));
            return r;
        });
    }).then(function () {
        // without json: the call succeeds; what the client hands back is
        // recorded (client_result): the reference answers stdout.trim() as
        // a JSON string (the client gets "plain"); a text/plain answer is not
        // JSON, and the client gets {}
        return step('commandExecute(text)', function (c, cb) {
            c.commandExecute(server, 'echo plain', cb);
        }, function (r, res) {
            check(res.statusCode === 200, 'status ' + res.statusCode);
            return { status: res.statusCode,
                content_type: res.headers['content-type'],
                client_result: r };
        });
    }).then(function () {
        // a failing script: the client gets an error (500)
        return step('commandExecute(exit 3)', function (c, cb) {
            c.commandExecute(server, 'echo oops >&2; exit 3', cb);
        }, function (err) {
            check(err.statusCode === 500, 'status ' + err.statusCode);
            return { status: err.statusCode, restCode: err.restCode,
                body: err.body };
        }, { expectError: true });
    }).then(function () {
        return step('capacity', function (c, cb) {
            c.capacity([server], cb);
        }, function (r) {
            check(r.capacities && r.capacities[server], 'capacity: ' +
                JSON.stringify(r));
            var cap = r.capacities[server];
            // disk is left out while the server has reported no disk usage
            // (docs/api.md, POST /capacity); cpu and ram come from sysinfo
            ['cpu', 'ram'].forEach(function (k) {
                check(typeof (cap[k]) === 'number' && cap[k] > 0, 'capacity: ' +
                    k + ' ' + JSON.stringify(cap));
            });
            check(cap.disk === undefined || typeof (cap.disk) === 'number',
                'capacity: disk ' + JSON.stringify(cap));
            return r;
        });
    }).then(function () {
        return step('capacity(all)', function (c, cb) {
            c.capacity(null, cb);
        }, function (r) {
            check(r.capacities && r.capacities[server], 'capacity(all): ' +
                JSON.stringify(r));
            return { servers: Object.keys(r.capacities).length };
        });
    });
}

function ticketSteps() {
    var t1, t2;
    var expires = new Date(Date.now() + 120000).toISOString();
    var scope = 'vm';
    var id = vmUuid;
    return step('waitlistTicketCreate', function (c, cb) {
        c.waitlistTicketCreate(server, { scope: scope, id: id,
            expires_at: expires, action: 'provision', extra: { flow: 1 } }, cb);
    }, function (r, res) {
        check(res.statusCode === 202, 'status ' + res.statusCode);
        check(isUuid(r.uuid), 'ticket uuid ' + JSON.stringify(r));
        check(Array.isArray(r.queue) && r.queue.length === 1 &&
            r.queue[0].uuid === r.uuid, 'queue ' + JSON.stringify(r.queue));
        t1 = r.uuid;
        return { uuid: r.uuid, queue: r.queue.length };
    }).then(function () {
        // a second ticket for the same (server, scope, id): queued behind
        return step('waitlistTicketCreate(second)', function (c, cb) {
            c.waitlistTicketCreate(server, { scope: scope, id: id,
                expires_at: expires, action: 'provision' }, cb);
        }, function (r) {
            check(isUuid(r.uuid) && r.queue.length === 2 &&
                r.queue[1].uuid === r.uuid, 'queue ' + JSON.stringify(r));
            t2 = r.uuid;
            return { uuid: r.uuid, queue: r.queue.length };
        });
    }).then(function () {
        return step('waitlistTicketGet', function (c, cb) {
            c.waitlistTicketGet(t1, cb);
        }, function (t) {
            check(t.uuid === t1 && t.server_uuid === server && t.scope === scope &&
                t.id === id && t.status === 'active', 'ticket ' +
                JSON.stringify(t));
            return { uuid: t.uuid, status: t.status };
        });
    }).then(function () {
        return step('waitlistTicketWait', function (c, cb) {
            c.waitlistTicketWait(t1, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'status ' + res.statusCode);
            return { status: res.statusCode };
        });
    }).then(function () {
        return step('waitlistTicketGet(second)', function (c, cb) {
            c.waitlistTicketGet(t2, cb);
        }, function (t) {
            check(t.status === 'queued', 'second ticket ' + JSON.stringify(t));
            return { uuid: t.uuid, status: t.status };
        });
    }).then(function () {
        return step('waitlistTicketRelease', function (c, cb) {
            c.waitlistTicketRelease(t1, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'status ' + res.statusCode);
            return { status: res.statusCode };
        });
    }).then(function () {
        // the second one became active: its wait answers
        return step('waitlistTicketWait(second)', function (c, cb) {
            c.waitlistTicketWait(t2, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'status ' + res.statusCode);
            return { status: res.statusCode };
        });
    }).then(function () {
        return step('waitlistTicketGet(released)', function (c, cb) {
            c.waitlistTicketGet(t1, cb);
        }, function (t) {
            check(t.status === 'finished', 'released ticket ' +
                JSON.stringify(t));
            return { uuid: t.uuid, status: t.status };
        });
    }).then(function () {
        return step('waitlistTicketRelease(second)', function (c, cb) {
            c.waitlistTicketRelease(t2, cb);
        }, function (obj, res) {
            check(res.statusCode === 204, 'status ' + res.statusCode);
            return { status: res.statusCode };
        });
    });
}

function taskSteps() {
    var createId;
    // a payload shaped like the one VMAPI sends (uuid chosen by the caller)
    var payload = {
        uuid: vmUuid,
        owner_uuid: '930896af-bf8c-48d4-885c-6573a94b1853',
        image_uuid: '2b683a82-a066-11e3-97ab-2faa44701c5a',
        brand: 'joyent-minimal',
        alias: 'cnapi-flow',
        hostname: 'cnapi-flow',
        ram: 256,
        max_physical_memory: 256,
        max_swap: 512,
        quota: 10,
        cpu_cap: 100,
        billing_id: '0b7f1e8a-7f3d-4c0e-9b3e-9f7f6e6c1a11',
        customer_metadata: {},
        internal_metadata: {},
        tags: {},
        nics: []
    };
    return step('createVm', function (c, cb) {
        c.createVm(server, payload, cb);
    }, function (r, res) {
        check(res.statusCode === 200, 'status ' + res.statusCode);
        check(isUuid(r.id), 'createVm: no task id in ' + JSON.stringify(r));
        createId = r.id;
        taskIds.createVm = r.id;
        return r;
    }).then(function () {
        return step('getTask', function (c, cb) {
            c.getTask(createId, cb);
        }, function (task) {
            checkTask(task, createId, 'machine_create', 'getTask');
            check(task.status === 'active' || task.status === 'complete',
                'getTask: status ' + task.status);
            return { task_id: task.id, task: task.task, status: task.status };
        });
    }).then(function () {
        return step('waitTask', function (c, cb) {
            c.waitTask(createId, { timeout: waitTimeout }, cb);
        }, function (task) {
            checkTask(task, createId, 'machine_create', 'waitTask');
            check(task.status === 'complete', 'waitTask: ended ' + task.status +
                ' ' + JSON.stringify(task.error || null));
            return { task_id: task.id, status: task.status,
                history: task.history.map(function (h) { return h.name; }) };
        });
    }).then(function () {
        return step('getVm', function (c, cb) {
            c.getVm(server, vmUuid, cb);
        }, function (vm) {
            check(vm.uuid === vmUuid, 'getVm: uuid ' + vm.uuid);
            check(vm.state === 'running', 'getVm: state ' + vm.state);
            return { vm_uuid: vm.uuid, state: vm.state, brand: vm.brand,
                ram: vm.ram, alias: vm.alias };
        });
    }).then(function () {
        return vmTask('stopVm', function (c, cb) {
            c.stopVm(server, vmUuid, cb);
        }, 'machine_shutdown', 'stopped');
    }).then(function () {
        return vmTask('startVm', function (c, cb) {
            c.startVm(server, vmUuid, cb);
        }, 'machine_boot', 'running');
    }).then(function () {
        return vmTask('rebootVm', function (c, cb) {
            c.rebootVm(server, vmUuid, cb);
        }, 'machine_reboot', 'running');
    }).then(function () {
        return vmTask('deleteVm', function (c, cb) {
            c.deleteVm(server, vmUuid, cb);
        }, 'machine_destroy', null);
    }).then(function () {
        return step('getVm(deleted)', function (c, cb) {
            c.getVm(server, vmUuid, cb);
        }, function (err) {
            check(err.statusCode === 404, 'getVm after delete: ' +
                err.statusCode + ' ' + err.message);
            return { status: err.statusCode, restCode: err.restCode };
        }, { expectError: true });
    });
}

main().then(function () {
    emit({ step: 'done', ok: true, steps: results.length, server: server,
        vm_uuid: vmUuid, task_ids: taskIds });
    closeAll();
    process.exit(0);
}, function (err) {
    fail('internal', null, undefined, 0, err);
});
